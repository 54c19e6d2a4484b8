//! The client command parser, on arbitrary input: what a hostile client can put in a WebSocket text
//! frame, or in a binary frame of the Protobuf protocol.
//!
//! Every input is first taken as a Protobuf binary frame: `pb::split_frame` (varint-length-delimited
//! messages, which must cover the whole frame), then `Command::parse_protobuf` on each, and the
//! requests are checked as below.
//!
//! The input is taken as a frame — as UTF-8 when it is (what a text frame carries), lossily
//! converted otherwise, so arbitrary bytes reach the parser too — and goes the way the session takes
//! it: `Command::split_frame`, then `Command::parse` on every line. What a parsed
//! command carries is then looked at the way the session does: channel names are validated and
//! matched as permission patterns, connection tokens are verified (with HMAC, RSA and EC keys
//! configured, so every algorithm path is reached). Nothing may panic, and:
//! - the lines of a frame are non-empty, hold no `\n`, and joined with `\n` give back the frame
//!   (without one trailing `\n`);
//! - a channel pattern matches itself, and `ChannelPattern::matches` agrees with a naive reference
//!   matcher.
#![no_main]

use std::sync::OnceLock;

use connector::auth::{AuthConfig, Verifier};
use libfuzzer_sys::fuzz_target;
use relay_protocol::channel::{ChannelPattern, validate_channel};
use relay_protocol::{Command, Request};

fn verifier() -> &'static Verifier {
    static VERIFIER: OnceLock<Verifier> = OnceLock::new();
    VERIFIER.get_or_init(|| {
        Verifier::new(&AuthConfig {
            hmac_secret_key: Some("fuzz-secret-fuzz-secret-fuzz-secret!".into()),
            rsa_public_key: Some(include_str!("../../connector/tests/keys/rsa_public.pem").into()),
            ecdsa_public_key: Some(include_str!("../../connector/tests/keys/ec_public.pem").into()),
            ..Default::default()
        })
        .expect("the test keys load")
    })
}

/// `*` matches any run of characters, everything else itself (a quadratic reference).
fn reference_match(pattern: &[u8], text: &[u8]) -> bool {
    // reach[j]: the pattern prefix so far matches text[..j].
    let mut reach = vec![false; text.len() + 1];
    reach[0] = true;
    for &p in pattern {
        if p == b'*' {
            for j in 1..=text.len() {
                reach[j] = reach[j] || reach[j - 1];
            }
        } else {
            for j in (1..=text.len()).rev() {
                reach[j] = reach[j - 1] && text[j - 1] == p;
            }
            reach[0] = false;
        }
    }
    reach[text.len()]
}

fn channel_checks(channel: &str, other: &str) {
    if validate_channel(channel).is_err() {
        return;
    }
    let pattern = ChannelPattern::new(channel);
    assert!(pattern.matches(channel), "{channel:?} must match itself");
    if other.len() <= 512 {
        assert_eq!(
            pattern.matches(other),
            reference_match(channel.as_bytes(), other.as_bytes()),
            "pattern {channel:?} on {other:?}"
        );
    }
}

/// What a parsed request is checked for, whichever encoding it came in (`context` names the input).
fn request_checks(request: &Request, context: &str) {
    let _ = request.name();
    match request {
        Request::Connect(c) => {
            let _ = verifier().verify_cached::<serde_json::Value>(&c.token);
        }
        Request::Refresh(r) => {
            let _ = verifier().verify_cached::<serde_json::Value>(&r.token);
        }
        Request::Subscribe(s) => {
            channel_checks(&s.channel, context);
            let _ = verifier().verify_cached::<serde_json::Value>(&s.token);
        }
        Request::SubRefresh(s) => {
            channel_checks(&s.channel, context);
            let _ = verifier().verify_cached::<serde_json::Value>(&s.token);
        }
        Request::Publish(p) => channel_checks(&p.channel, context),
        Request::History(h) => channel_checks(&h.channel, context),
        Request::Unsubscribe(c) | Request::Presence(c) | Request::PresenceStats(c) => {
            channel_checks(&c.channel, context);
        }
        Request::Ping | Request::Rpc(_) | Request::Invalid { .. } => {}
    }
}

/// Bytes of `n` as a varint (7 bits a byte).
fn varint_len(mut n: usize) -> usize {
    let mut len = 1;
    while n >= 0x80 {
        n >>= 7;
        len += 1;
    }
    len
}

/// The same input as a Protobuf binary frame: `pb::split_frame`, then `Command::parse_protobuf` on
/// every length-delimited message, as a Protobuf session takes it.
fn protobuf_frame(frame: &[u8]) {
    let Ok(messages) = relay_protocol::pb::split_frame(frame) else {
        return;
    };
    let mut covered = 0;
    for message in &messages {
        covered += varint_len(message.len()) + message.len();
    }
    assert_eq!(covered, frame.len(), "the messages cover the whole frame");
    for message in messages {
        let Ok(Command::Request { id, request }) = Command::parse_protobuf(message) else {
            continue;
        };
        assert!(id > 0, "requests have an id");
        request_checks(&request, "protobuf frame");
    }
}

fn frame(frame: &str) {
    let Ok(lines) = Command::split_frame(frame) else {
        return;
    };
    assert_eq!(
        lines.join("\n"),
        frame.strip_suffix('\n').unwrap_or(frame),
        "lines rejoin to the frame"
    );
    for line in lines {
        assert!(!line.is_empty() && !line.contains('\n'), "line {line:?}");
        let Ok(command) = Command::parse(line) else {
            continue;
        };
        let Command::Request { id, request } = command else {
            continue;
        };
        assert!(id > 0, "requests have an id");
        request_checks(&request, line);
    }
}

fuzz_target!(|data: &[u8]| {
    protobuf_frame(data);
    match std::str::from_utf8(data) {
        Ok(text) => frame(text),
        Err(_) => frame(&String::from_utf8_lossy(data)),
    }
});
