use super::scrape::{Changelog, Slot};
use super::*;

fn metrics(capture: &CaptureStatus) -> (Metrics, Hub, StreamStatus) {
    let config = crate::Config::from_json(r#"{"database":{"url":"postgres://x"}}"#).unwrap();
    let verifier = crate::auth::Verifier::new(&config.auth).unwrap();
    let hub = Hub::new();
    let stream = StreamStatus::default();
    let m = Metrics::new(&hub, &stream, capture, &verifier);
    (m, hub, stream)
}

/// The value of the sample line `series` (name and labels) in `text`.
fn sample<'a>(text: &'a str, series: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
}

#[test]
fn the_exposition_keeps_the_names_and_formats_scrapers_rely_on() {
    let (m, _hub, stream) = metrics(&CaptureStatus::default());
    m.connections.inc();
    m.connections.inc();
    m.connections.dec();
    m.publications_in.inc_by(3);
    m.record_recovery(true);
    m.record_recovery(false);
    m.record_recovery(false);
    stream.reconnects.inc();
    stream.cursor.set(42);
    stream.lag.observe(0.003);
    stream.lag.observe(0.7);
    let text = m.encode(Scrape {
        pending: Some(Pending {
            connections: 2,
            evictions: 5,
        }),
        channels: 4,
        subscriptions: 6,
        presence_members: 1,
        changelog: Some(Changelog {
            unsequenced: 1,
            oldest_unsequenced_secs: 0.25,
            notify_queue_usage: 0.0,
        }),
        wal_leader: None,
        slot: None,
    });
    for (series, value) in [
        ("relay_connections", "1"),
        ("relay_publications_in_total", "3"),
        ("relay_publications_out_total", "0"),
        ("relay_recoveries_total", "1"),
        ("relay_recoveries_failed_total", "2"),
        ("relay_slow_disconnects_total", "0"),
        ("relay_stream_reconnects_total", "1"),
        ("relay_stream_catch_up_reads_total", "0"),
        ("relay_sequencer_polls_total", "0"),
        ("relay_stream_cursor", "42"),
        ("relay_pending_connections", "2"),
        ("relay_pending_evictions_total", "5"),
        ("relay_channels", "4"),
        ("relay_subscriptions", "6"),
        ("relay_presence_members", "1"),
        ("relay_changelog_unsequenced", "1"),
        ("relay_changelog_oldest_unsequenced_seconds", "0.25"),
        ("relay_delivery_lag_seconds_bucket{le=\"0.001\"}", "0"),
        ("relay_delivery_lag_seconds_bucket{le=\"0.005\"}", "1"),
        ("relay_delivery_lag_seconds_bucket{le=\"0.5\"}", "1"),
        ("relay_delivery_lag_seconds_bucket{le=\"1\"}", "2"),
        ("relay_delivery_lag_seconds_bucket{le=\"+Inf\"}", "2"),
        ("relay_delivery_lag_seconds_count", "2"),
    ] {
        assert_eq!(sample(&text, series), Some(value), "{series} in\n{text}");
    }
    assert!(sample(&text, "relay_pg_notification_queue_usage").is_some());
    assert!(text.contains("# TYPE relay_publications_in_total counter\n"));
    assert!(text.contains("# TYPE relay_connections gauge\n"));
    assert!(text.contains("# TYPE relay_delivery_lag_seconds histogram\n"));
    assert!(text.contains(
        "# HELP relay_connections Open client connections (WebSocket, HTTP-streaming, SSE).\n"
    ));
    // Trigger mode, no JWKS URL: no wal or JWKS series at all.
    assert!(
        !text.contains("relay_wal_") && !text.contains("relay_jwks_"),
        "{text}"
    );
    // One help and type line per family.
    assert_eq!(
        text.matches("# TYPE relay_delivery_lag_seconds ").count(),
        1
    );
}

#[test]
fn a_failed_database_read_leaves_its_lines_out() {
    let (m, _hub, _stream) = metrics(&CaptureStatus::default());
    let text = m.encode(Scrape::default());
    for name in [
        "relay_changelog_unsequenced",
        "relay_changelog_oldest_unsequenced_seconds",
        "relay_pg_notification_queue_usage",
        "relay_pending_connections",
    ] {
        assert!(!text.contains(name), "{name} in\n{text}");
    }
    assert_eq!(sample(&text, "relay_channels"), Some("0"));
}

#[test]
fn a_jwks_url_adds_the_fetch_counter() {
    let config = crate::Config::from_json(
        r#"{"database":{"url":"postgres://x"},"auth":{"jwks_url":"http://127.0.0.1:9/jwks"}}"#,
    )
    .unwrap();
    let verifier = crate::auth::Verifier::new(&config.auth).unwrap();
    let m = Metrics::new(
        &Hub::new(),
        &StreamStatus::default(),
        &CaptureStatus::default(),
        &verifier,
    );
    let text = m.encode(Scrape::default());
    assert_eq!(
        sample(&text, "relay_jwks_fetches_total"),
        Some("0"),
        "{text}"
    );
}

#[test]
fn wal_mode_adds_the_leaders_counters_and_the_slot() {
    let capture = CaptureStatus::default();
    let _ = capture.mode.set(CaptureMode::Wal);
    let (m, _hub, _stream) = metrics(&capture);
    capture.slot_losses.inc();
    capture.transactions.inc_by(7);
    let text = m.encode(Scrape {
        wal_leader: Some(true),
        slot: Some(Slot {
            exists: true,
            retained_bytes: 4096,
            safe_bytes: None,
            wal_status: Some("extended".into()),
        }),
        ..Scrape::default()
    });
    for (series, value) in [
        ("relay_wal_leader", "1"),
        ("relay_wal_slot_losses_total", "1"),
        ("relay_wal_transactions_total", "7"),
        ("relay_wal_leaderships_total", "0"),
        ("relay_wal_slot_exists", "1"),
        ("relay_wal_slot_retained_bytes", "4096"),
        ("relay_wal_slot_status{status=\"reserved\"}", "0"),
        ("relay_wal_slot_status{status=\"extended\"}", "1"),
        ("relay_wal_slot_status{status=\"lost\"}", "0"),
    ] {
        assert_eq!(sample(&text, series), Some(value), "{series} in\n{text}");
    }
    assert!(!text.contains("relay_wal_slot_safe_bytes"), "{text}");
    assert_eq!(
        text.matches("# TYPE relay_wal_slot_status gauge").count(),
        1
    );
}
