use ring::hmac;
use serde_json::value::RawValue;

use super::delivery::sign;
use super::envelope::{NamedData, envelope};
use super::outcome::{RefusalStatus, TargetError, outcome};
use super::{MAX_OUTCOME_BYTES, MAX_REASON_CHARS};

#[test]
fn outcomes_follow_the_contract() {
    let refused = |body: &str| match outcome(body.as_bytes(), "m1") {
        Err(TargetError::Refused(r)) => Some((r.status, r.reason)),
        _ => None,
    };
    // Success and missing outcomes.
    for ok in [
        "",
        "ok",
        "{}",
        r#"{"ok":true}"#,
        "[1]",
        r#"{"results":[{"index":0,"id":"m1","status":"inserted"}]}"#,
        r#"{"results":[{"id":"m1","status":"duplicate","reason":"again"}]}"#,
        r#"{"results":[{"index":0,"id":null,"status":"accepted"}]}"#,
    ] {
        assert!(outcome(ok.as_bytes(), "m1").is_ok(), "{ok}");
    }
    assert_eq!(
        refused(r#"{"results":[{"index":0,"id":"m1","status":"rejected","reason":"not yours"}]}"#),
        Some((RefusalStatus::Rejected, "not yours".to_owned()))
    );
    assert_eq!(
        refused(r#"{"results":[{"id":"m1","status":"invalid","reason":"a\nb"}]}"#),
        Some((RefusalStatus::Invalid, "ab".to_owned()))
    );
    assert_eq!(
        refused(r#"{"results":[{"id":"m1","status":"skipped"}]}"#),
        Some((RefusalStatus::Skipped, String::new()))
    );
    // Invalid outcomes are failures, never success.
    for bad in [
        r#"{"results":{}}"#,
        r#"{"results":[]}"#,
        r#"{"results":[{"id":"other","status":"inserted"}]}"#,
        r#"{"results":[{"id":"m1","status":"maybe"}]}"#,
        r#"{"results":[{"id":"m1"}]}"#,
    ] {
        assert!(
            matches!(outcome(bad.as_bytes(), "m1"), Err(TargetError::Failed(_))),
            "{bad}"
        );
    }
    let huge = format!(r#"{{"x":"{}"}}"#, "a".repeat(MAX_OUTCOME_BYTES));
    assert!(matches!(
        outcome(huge.as_bytes(), "m1"),
        Err(TargetError::Failed(_))
    ));
    let long = format!(
        r#"{{"results":[{{"id":"m1","status":"rejected","reason":"{}"}}]}}"#,
        "x".repeat(5000)
    );
    assert_eq!(refused(&long).unwrap().1.len(), MAX_REASON_CHARS);
}

#[test]
fn envelope_encodes_object_data_as_json_text() {
    let raw: Box<RawValue> =
        serde_json::from_str(r#"{"name":"chatMsg","data":{"username":"a","content":"hi"}}"#)
            .unwrap();
    let named: NamedData<'_> = serde_json::from_str(raw.get()).unwrap();
    let env = envelope("outgoing-chat", "alice", "c1", &named, "m1".into());
    let v = serde_json::to_value(&env).unwrap();
    assert_eq!(v["messages"][0]["name"], "chatMsg");
    assert_eq!(v["messages"][0]["clientId"], "alice");
    assert_eq!(v["messages"][0]["clientKind"], "user");
    assert_eq!(v["messages"][0]["encoding"], "json");
    let inner: serde_json::Value =
        serde_json::from_str(v["messages"][0]["data"].as_str().unwrap()).unwrap();
    assert_eq!(inner["content"], "hi");
}

#[test]
fn the_sender_namespace_follows_the_caller() {
    let raw = r#"{"name":"chatMsg","data":{}}"#;
    let named: NamedData<'_> = serde_json::from_str(raw).unwrap();
    let kind = |client: &str, connection: &str| {
        let env = envelope("c", client, connection, &named, "m".into());
        serde_json::to_value(&env).unwrap()["messages"][0]["clientKind"].clone()
    };
    let anon = "0b8f3c2e-1d4a-4f5e-9a7b-2c3d4e5f6a7b";
    // An anonymous session sends its own connection id; a user whose `sub` is that same id, on
    // another connection, is a user.
    assert_eq!(kind(anon, anon), "anonymous");
    assert_eq!(kind(anon, "another-connection"), "user");
    assert_eq!(kind("api", "api"), "server");
}

#[test]
fn the_signature_is_the_writers_scheme() {
    let key = hmac::Key::new(hmac::HMAC_SHA256, b"0123456789abcdef0123456789abcdef");
    let header = sign(&key, 1_700_000_000, br#"{"messages":[]}"#);
    let (t, v1) = header.split_once(",v1=").unwrap();
    assert_eq!(t, "t=1700000000");
    assert_eq!(v1.len(), 64);
    let tag: Vec<u8> = (0..64)
        .step_by(2)
        .map(|i| u8::from_str_radix(&v1[i..i + 2], 16).unwrap())
        .collect();
    assert!(hmac::verify(&key, br#"1700000000.{"messages":[]}"#, &tag).is_ok());
}
