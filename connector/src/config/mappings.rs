//! `mappings[]`: table → channel mappings, with the channel template parsed at load
//! ([`ChannelTemplate`]: literal text and `{column}` placeholders).

use std::collections::HashSet;
use std::fmt;
use std::ops::Deref;

use relay_protocol::channel::{ChannelPattern, validate_channel};
use serde::{Deserialize, Deserializer};

use crate::error::ConfigError;

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
    pub channel: ChannelTemplate,
    /// Only these columns leave the database (default: all).
    #[serde(default)]
    pub columns: Option<Vec<String>>,
}

fn default_schema() -> String {
    "public".to_owned()
}

impl Mapping {
    /// Checks the mapping; `field` is its path (`mappings[0]`).
    pub(crate) fn check(&self, field: &str) -> Result<(), ConfigError> {
        let f = |name: &str| format!("{field}.{name}");
        check_ident(&f("schema"), &self.schema)?;
        check_ident(&f("table"), &self.table)?;
        if self.operations.is_empty() {
            return Err(ConfigError::new(
                f("operations"),
                "must name at least one of INSERT, UPDATE, DELETE",
            ));
        }
        let mut seen = HashSet::new();
        for op in &self.operations {
            if !seen.insert(op) {
                return Err(ConfigError::new(
                    f("operations"),
                    format!("{} is listed twice", op.sql()),
                ));
            }
        }
        if let Some(cols) = &self.columns {
            if cols.is_empty() {
                return Err(ConfigError::new(
                    f("columns"),
                    "must not be empty (omit it to publish every column)",
                ));
            }
            let mut seen = HashSet::new();
            for (j, col) in cols.iter().enumerate() {
                check_ident(&format!("{field}.columns[{j}]"), col)?;
                if !seen.insert(col) {
                    return Err(ConfigError::new(
                        f("columns"),
                        format!("{col:?} is listed twice"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// What makes two mappings the same capture: table, operations, channel and columns.
    pub(crate) fn identity(&self) -> (&str, &str, Vec<&str>, &str, Option<&[String]>) {
        let mut ops: Vec<&str> = self.operations.iter().map(|o| o.sql()).collect();
        ops.sort_unstable();
        (
            &self.schema,
            &self.table,
            ops,
            self.channel.as_str(),
            self.columns.as_deref(),
        )
    }
}

/// A part of a channel template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplatePart {
    /// Literal text.
    Literal(String),
    /// A column whose value is inserted.
    Column(String),
}

/// A mapping's channel, parsed: literal text and `{column}` placeholders, and the channel pattern
/// it covers (every `{column}` becomes `*`). Reads as the template text (`&str`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelTemplate {
    text: String,
    parts: Vec<TemplatePart>,
    pattern: ChannelPattern,
}

impl ChannelTemplate {
    /// Parses a template; the error says what is wrong with it.
    pub fn parse(text: &str) -> Result<Self, String> {
        let parts = parse_template(text)?;
        let glob: String = parts
            .iter()
            .map(|p| match p {
                TemplatePart::Literal(s) => s.as_str(),
                TemplatePart::Column(_) => "*",
            })
            .collect();
        Ok(Self {
            text: text.to_owned(),
            pattern: ChannelPattern::new(&glob),
            parts,
        })
    }

    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Its parts, in order.
    pub fn parts(&self) -> &[TemplatePart] {
        &self.parts
    }

    /// The channels it can produce.
    pub fn pattern(&self) -> &ChannelPattern {
        &self.pattern
    }

    /// Whether it is one fixed channel (no placeholder).
    pub fn is_fixed(&self) -> bool {
        self.parts
            .iter()
            .all(|p| matches!(p, TemplatePart::Literal(_)))
    }
}

impl Deref for ChannelTemplate {
    type Target = str;

    fn deref(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for ChannelTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for ChannelTemplate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// The channel pattern a mapping's template covers: every `{column}` becomes `*` (an invalid
/// template covers nothing but itself).
pub fn mapping_pattern(template: &str) -> ChannelPattern {
    match ChannelTemplate::parse(template) {
        Ok(t) => t.pattern,
        Err(_) => ChannelPattern::new(""),
    }
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
            if validate_channel(s).is_err() {
                return Err(format!(
                    "literal {s:?} has characters not allowed in channel names"
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

/// Checks that `value` is a plain identifier (see [`is_ident`]).
pub(crate) fn check_ident(field: &str, value: &str) -> Result<(), ConfigError> {
    if is_ident(value) {
        Ok(())
    } else {
        Err(ConfigError::new(
            field,
            format!(
                "{value:?} is not a plain identifier (letters, digits, _; not starting with a digit; at most 63)"
            ),
        ))
    }
}

/// Whether `channel` is fed by one of `mappings` (such channels take no client publications).
pub fn is_table_channel(mappings: &[Mapping], channel: &str) -> bool {
    mappings
        .iter()
        .any(|m| m.channel.pattern().matches(channel))
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let t = ChannelTemplate::parse("room:{room_id}").unwrap();
        assert!(!t.is_fixed() && t.pattern().matches("room:1"));
        assert_eq!(&*t, "room:{room_id}");
        assert!(ChannelTemplate::parse("incoming-chat").unwrap().is_fixed());
    }
}
