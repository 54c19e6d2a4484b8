//! Durations in the configuration: every `*_secs` / `*_ms` key takes a number in its unit, as it
//! always has (`"poll_interval_ms": 250`, `RELAY__STREAM__POLL_INTERVAL_MS=250`), or a humantime
//! text (`"250ms"`, `"2m"`, `"1h 30m"`). Keys whose value is a [`Duration`] also answer to their name
//! without the unit (`"poll_interval": "250ms"`).

use std::fmt;
use std::time::Duration;

use serde::Deserializer;
use serde::de::{self, Visitor};

use crate::error::ConfigError;

/// The unit a bare number is read in.
#[derive(Clone, Copy)]
enum Unit {
    Secs,
    Millis,
}

struct DurationVisitor(Unit);

impl Visitor<'_> for DurationVisitor {
    type Value = Duration;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.0 {
            Unit::Secs => "seconds",
            Unit::Millis => "milliseconds",
        };
        write!(
            f,
            "a whole number of {unit}, or a duration like \"250ms\", \"30s\", \"5m\", \"1h\""
        )
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
        Ok(match self.0 {
            Unit::Secs => Duration::from_secs(v),
            Unit::Millis => Duration::from_millis(v),
        })
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
        match u64::try_from(v) {
            Ok(v) => self.visit_u64(v),
            Err(_) => Err(E::invalid_value(de::Unexpected::Signed(v), &self)),
        }
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
        // The environment may deliver a number as text.
        if let Ok(n) = v.trim().parse::<u64>() {
            return self.visit_u64(n);
        }
        humantime::parse_duration(v).map_err(|e| {
            E::custom(format!(
                "{v:?} is not a duration ({e}); {}",
                Expecting(self.0)
            ))
        })
    }
}

struct Expecting(Unit);

impl fmt::Display for Expecting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        DurationVisitor(self.0).expecting(f)
    }
}

/// Deserializes a duration whose bare numbers are seconds.
pub(crate) fn secs<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    d.deserialize_any(DurationVisitor(Unit::Secs))
}

/// Deserializes a duration whose bare numbers are milliseconds.
pub(crate) fn millis<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    d.deserialize_any(DurationVisitor(Unit::Millis))
}

/// Deserializes whole seconds as a number (for keys that stay `u64`), also from a humantime text
/// that is a whole number of seconds (`"2m"`).
pub(crate) fn whole_secs<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let duration = secs(d)?;
    if duration.subsec_nanos() != 0 {
        return Err(de::Error::custom(format!(
            "{} is not a whole number of seconds",
            humantime::format_duration(duration)
        )));
    }
    Ok(duration.as_secs())
}

/// Like [`whole_secs`], for an optional key.
pub(crate) fn opt_whole_secs<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    whole_secs(d).map(Some)
}

/// Checks that `value` lies in `min..=max`; the problem names the range.
pub(crate) fn check(
    field: &str,
    value: Duration,
    min: Duration,
    max: Duration,
) -> Result<(), ConfigError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(ConfigError::new(
            field,
            format!(
                "{} is out of range {}..={}",
                humantime::format_duration(value),
                humantime::format_duration(min),
                humantime::format_duration(max)
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    struct T {
        #[serde(deserialize_with = "secs")]
        s: Duration,
        #[serde(deserialize_with = "millis")]
        ms: Duration,
        #[serde(deserialize_with = "whole_secs")]
        w: u64,
    }

    fn parse(json: &str) -> Result<T, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn numbers_keep_their_unit_and_text_is_humantime() {
        let t = parse(r#"{"s": 3, "ms": 250, "w": 7}"#).unwrap();
        assert_eq!(
            (t.s, t.ms, t.w),
            (Duration::from_secs(3), Duration::from_millis(250), 7)
        );
        let t = parse(r#"{"s": "1m", "ms": "2s", "w": "1h"}"#).unwrap();
        assert_eq!(
            (t.s, t.ms, t.w),
            (Duration::from_secs(60), Duration::from_secs(2), 3600)
        );
        let t = parse(r#"{"s": "5", "ms": "10", "w": "9"}"#).unwrap();
        assert_eq!(
            (t.s, t.ms, t.w),
            (Duration::from_secs(5), Duration::from_millis(10), 9)
        );
        let e = parse(r#"{"s": -1, "ms": 1, "w": 1}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("whole number of seconds"), "{e}");
        let e = parse(r#"{"s": "soon", "ms": 1, "w": 1}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"soon\"") && e.contains("\"30s\""), "{e}");
        let e = parse(r#"{"s": 1, "ms": 1, "w": "1500ms"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("whole number of seconds"), "{e}");
    }

    #[test]
    fn ranges_are_shown_as_durations() {
        let e = check(
            "x",
            Duration::from_millis(5),
            Duration::from_millis(10),
            Duration::from_secs(60),
        )
        .unwrap_err();
        assert_eq!(e.field, "x");
        assert_eq!(e.problem, "5ms is out of range 10ms..=1m");
    }
}
