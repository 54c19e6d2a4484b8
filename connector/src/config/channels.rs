//! `channels[]`: channel permissions by pattern (first match wins). The decisions are made by
//! [`crate::auth::permissions`]; this file holds what they are made from.

use serde::{Deserialize, Deserializer};
use serde_json::Value;

use super::channel_rules::{ChannelRules, PatternEntry};
use crate::error::ConfigError;

/// Who is allowed to do something on a channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// A fixed level.
    Level(Level),
    /// Only these users (the token's `sub`).
    Users {
        /// User ids.
        users: Vec<String>,
    },
    /// Connections whose token claim `claim` equals `value`, or is an array containing it (e.g.
    /// `{"claim": "roles", "value": "admin"}`).
    Claim {
        /// The connection-token claim.
        claim: String,
        /// The value it must equal or contain.
        value: String,
    },
}

/// The fixed access levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Every connection, anonymous ones included.
    Anyone,
    /// Connections with a user (a token with a non-empty `sub`).
    Authenticated,
    /// Connections currently subscribed to the channel (publish, history, presence only).
    Subscriber,
    /// Only with a subscription token for the channel (subscribe only).
    Token,
    /// No client.
    Nobody,
}

impl Default for Access {
    fn default() -> Self {
        Self::Level(Level::Nobody)
    }
}

/// The forms an [`Access`] may take, for error messages.
const ACCESS_FORMS: &str = "valid values: \"anyone\", \"authenticated\", \"subscriber\", \"token\", \
     \"nobody\", {\"users\": [\"user id\", ...]} or {\"claim\": \"claim name\", \"value\": \"text\"}";

impl<'de> Deserialize<'de> for Access {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Users {
            users: Vec<String>,
        }
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Claim {
            claim: String,
            value: String,
        }
        use serde::de::Error as _;
        let value = Value::deserialize(d)?;
        let fail = |what: String| D::Error::custom(format!("{what}; {ACCESS_FORMS}"));
        match value {
            Value::String(s) => serde_json::from_value::<Level>(Value::String(s.clone()))
                .map(Access::Level)
                .map_err(|_| fail(format!("{s:?} is not an access level"))),
            Value::Object(o) if o.contains_key("users") => {
                serde_json::from_value::<Users>(Value::Object(o))
                    .map(|u| Access::Users { users: u.users })
                    .map_err(|e| fail(format!("bad users entry ({e})")))
            }
            Value::Object(o) if o.contains_key("claim") => {
                serde_json::from_value::<Claim>(Value::Object(o))
                    .map(|c| Access::Claim {
                        claim: c.claim,
                        value: c.value,
                    })
                    .map_err(|e| fail(format!("bad claim entry ({e})")))
            }
            other => Err(fail(format!("{other} is not an access rule"))),
        }
    }
}

/// A `channels[]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelRule {
    /// Channel pattern (`*` matches any run of characters).
    pub channel: String,
    /// Who may subscribe (default `nobody`; a valid subscription token always may).
    #[serde(default)]
    pub subscribe: Access,
    /// Who may publish (default `nobody`).
    #[serde(default)]
    pub publish: Access,
    /// Who may read history (default `subscriber`).
    #[serde(default)]
    pub history: Option<Access>,
    /// Who may query presence (default `subscriber`).
    #[serde(default)]
    pub presence: Option<Access>,
    /// Only the users named after the channel's last `#` may use it.
    #[serde(default)]
    pub user_limited: bool,
    /// Delta compressions a subscription may negotiate (`["fossil"]`; default none: a subscribe
    /// asking for `delta` gets full payloads and no `delta: true`).
    #[serde(default)]
    pub allowed_delta_types: Vec<DeltaType>,
}

/// A delta compression of publications.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeltaType {
    /// Fossil deltas (`delta: "fossil"` in the subscribe request).
    Fossil,
}

impl ChannelRules<ChannelRule> {
    /// Whether subscriptions to `channel` may negotiate `delta` (its entry's
    /// `allowed_delta_types`).
    pub fn delta_allowed(&self, channel: &str, delta: DeltaType) -> bool {
        self.first_match(channel)
            .is_some_and(|c| c.allowed_delta_types.contains(&delta))
    }
}

impl PatternEntry for ChannelRule {
    fn channel(&self) -> &str {
        &self.channel
    }
}

/// Checks the entries for configuration mistakes; the error names the field.
pub(crate) fn check(rules: &ChannelRules<ChannelRule>) -> Result<(), ConfigError> {
    rules.check_patterns("channels")?;
    for (i, r) in rules.iter().enumerate() {
        let field = |f: &str| format!("channels[{i}].{f}");
        let checks = [
            ("subscribe", Some(&r.subscribe)),
            ("publish", Some(&r.publish)),
            ("history", r.history.as_ref()),
            ("presence", r.presence.as_ref()),
        ];
        for (name, access) in checks {
            let problem = match access {
                Some(Access::Level(Level::Subscriber)) if name == "subscribe" => {
                    "\"subscriber\" applies to publish, history and presence only"
                }
                Some(Access::Level(Level::Token)) if name != "subscribe" => {
                    "\"token\" applies to subscribe only"
                }
                Some(Access::Users { users }) if users.is_empty() => {
                    "users must not be empty (use \"nobody\")"
                }
                Some(Access::Claim { claim, .. }) if claim.is_empty() => "claim must not be empty",
                _ => continue,
            };
            return Err(ConfigError::new(field(name), problem));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<ChannelRules<ChannelRule>, String> {
        serde_json::from_str(json).map_err(|e| e.to_string())
    }

    #[test]
    fn access_errors_list_the_valid_values() {
        let e = parse(r#"[{"channel":"a","subscribe":"everyone"}]"#).unwrap_err();
        assert!(
            e.contains("\"everyone\" is not an access level") && e.contains("\"authenticated\""),
            "{e}"
        );
        let e = parse(r#"[{"channel":"a","subscribe":{"user":["x"]}}]"#).unwrap_err();
        assert!(e.contains("{\"users\""), "{e}");
        let e = parse(r#"[{"channel":"a","subscribe":{"claim":"r"}}]"#).unwrap_err();
        assert!(e.contains("bad claim entry"), "{e}");
        let ok = parse(
            r#"[{"channel":"a","subscribe":"anyone","publish":{"users":["u"]},"history":{"claim":"r","value":"v"}}]"#,
        )
        .unwrap();
        assert_eq!(ok[0].subscribe, Access::Level(Level::Anyone));
        assert!(check(&ok).is_ok());
        let bad = parse(r#"[{"channel":"a","publish":"token"}]"#).unwrap();
        assert_eq!(check(&bad).unwrap_err().field, "channels[0].publish");
    }
}
