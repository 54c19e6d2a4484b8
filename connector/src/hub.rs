//! The hub: which session is subscribed to which channel, and fan-out.
//!
//! A publication is encoded once into a [`Delivery`] (the whole `pub` push frame) and the same
//! reference-counted bytes go to every subscriber's bounded mailbox. Fan-out never waits: a mailbox
//! that is full marks its session as slow (the session then closes with 3008 and the client recovers
//! from history), so one slow client never delays the others and memory stays bounded.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use axum::extract::ws::Utf8Bytes;
use serde_json::value::RawValue;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use relay_protocol::reply::{Publication, encode_pub_push};

/// One publication, encoded once, shared by every subscriber.
#[derive(Debug)]
pub struct Delivery {
    /// The channel.
    pub channel: Arc<str>,
    /// Offset in the channel.
    pub offset: u64,
    /// The channel's epoch.
    pub epoch: Arc<str>,
    /// The complete `pub` push frame.
    pub frame: Utf8Bytes,
}

/// A session as the hub sees it: its mailbox and the token that marks it slow.
#[derive(Debug, Clone)]
pub struct Subscriber {
    /// The session's bounded mailbox.
    pub mailbox: mpsc::Sender<Arc<Delivery>>,
    /// Cancelled when the mailbox overflows.
    pub slow: CancellationToken,
    /// Bytes of frames in the mailbox (the session subtracts what it takes out).
    pub queued: Arc<AtomicUsize>,
    /// The most bytes the mailbox may hold.
    pub max_bytes: usize,
}

/// The channel registry.
#[derive(Debug, Default)]
pub struct Hub {
    channels: RwLock<HashMap<Arc<str>, HashMap<u64, Subscriber>>>,
    next_session: AtomicU64,
    delivered: AtomicU64,
    slow_disconnects: AtomicU64,
    subscriptions: AtomicU64,
}

impl Hub {
    /// A new, empty hub.
    pub fn new() -> Self {
        Self::default()
    }

    /// A process-unique session number (the key of a session's subscriptions).
    pub fn next_session_id(&self) -> u64 {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    /// Adds `session` as a subscriber of `channel`.
    pub fn subscribe(&self, channel: &str, session: u64, subscriber: Subscriber) {
        let mut channels = self.channels.write().unwrap_or_else(|e| e.into_inner());
        let added = match channels.get_mut(channel) {
            Some(subs) => subs.insert(session, subscriber).is_none(),
            None => {
                channels.insert(Arc::from(channel), HashMap::from([(session, subscriber)]));
                true
            }
        };
        if added {
            self.subscriptions.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Removes `session` from `channel`.
    pub fn unsubscribe(&self, channel: &str, session: u64) {
        let mut channels = self.channels.write().unwrap_or_else(|e| e.into_inner());
        if let Some(subs) = channels.get_mut(channel) {
            if subs.remove(&session).is_some() {
                self.subscriptions.fetch_sub(1, Ordering::Relaxed);
            }
            if subs.is_empty() {
                channels.remove(channel);
            }
        }
    }

    /// Whether anyone on this node is subscribed to `channel`.
    pub fn has_subscribers(&self, channel: &str) -> bool {
        let channels = self.channels.read().unwrap_or_else(|e| e.into_inner());
        channels.contains_key(channel)
    }

    /// Number of channels with at least one subscriber.
    pub fn channel_count(&self) -> usize {
        self.channels
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Subscriptions on this node.
    pub fn subscription_count(&self) -> u64 {
        self.subscriptions.load(Ordering::Relaxed)
    }

    /// Publications written to mailboxes so far.
    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }

    /// Sessions marked slow so far.
    pub fn slow_disconnects(&self) -> u64 {
        self.slow_disconnects.load(Ordering::Relaxed)
    }

    /// Encodes a publication once and hands it to every subscriber of its channel.
    pub fn publish(
        &self,
        channel: &str,
        offset: u64,
        epoch: &str,
        data: &RawValue,
        info: Option<&RawValue>,
    ) {
        let channels = self.channels.read().unwrap_or_else(|e| e.into_inner());
        let Some((name, subs)) = channels.get_key_value(channel) else {
            return;
        };
        let frame = encode_pub_push(channel, &Publication { data, offset, info });
        let delivery = Arc::new(Delivery {
            channel: name.clone(),
            offset,
            epoch: Arc::from(epoch),
            frame: Utf8Bytes::from(frame),
        });
        self.fan_out(subs, &delivery);
    }

    /// Hands an event frame (a `join` or `leave` push) to every subscriber of `channel`. It travels
    /// like a publication (same mailbox, same byte bound) with offset 0; the session passes it on only
    /// to subscriptions that asked for join/leave.
    pub fn push_event(&self, channel: &str, frame: String) {
        let channels = self.channels.read().unwrap_or_else(|e| e.into_inner());
        let Some((name, subs)) = channels.get_key_value(channel) else {
            return;
        };
        let delivery = Arc::new(Delivery {
            channel: name.clone(),
            offset: 0,
            epoch: Arc::from(""),
            frame: Utf8Bytes::from(frame),
        });
        self.fan_out(subs, &delivery);
    }

    /// Channels with subscribers on this node and their subscription counts.
    pub fn channel_counts(&self) -> Vec<(String, u64)> {
        let channels = self.channels.read().unwrap_or_else(|e| e.into_inner());
        channels
            .iter()
            .map(|(name, subs)| (name.to_string(), subs.len() as u64))
            .collect()
    }

    fn fan_out(&self, subs: &HashMap<u64, Subscriber>, delivery: &Arc<Delivery>) {
        let len = delivery.frame.as_str().len();
        for sub in subs.values() {
            if sub.slow.is_cancelled() {
                continue;
            }
            let over_bytes = sub.queued.fetch_add(len, Ordering::Relaxed) + len > sub.max_bytes;
            let sent = !over_bytes && sub.mailbox.try_send(delivery.clone()).is_ok();
            if sent {
                self.delivered.fetch_add(1, Ordering::Relaxed);
            } else {
                sub.queued.fetch_sub(len, Ordering::Relaxed);
                if !sub.mailbox.is_closed() {
                    self.slow_disconnects.fetch_add(1, Ordering::Relaxed);
                    sub.slow.cancel();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fan_out_and_slow_marking() {
        let hub = Hub::new();
        let (tx1, mut rx1) = mpsc::channel(8);
        let (tx2, _rx2) = mpsc::channel(1);
        let slow2 = CancellationToken::new();
        hub.subscribe(
            "c",
            1,
            Subscriber {
                mailbox: tx1,
                slow: CancellationToken::new(),
                queued: Arc::new(AtomicUsize::new(0)),
                max_bytes: 1 << 20,
            },
        );
        hub.subscribe(
            "c",
            2,
            Subscriber {
                mailbox: tx2,
                slow: slow2.clone(),
                queued: Arc::new(AtomicUsize::new(0)),
                max_bytes: 1 << 20,
            },
        );
        let data = RawValue::from_string("{\"a\":1}".into()).unwrap();
        hub.publish("c", 1, "e", &data, None);
        hub.publish("c", 2, "e", &data, None);
        hub.publish("other", 1, "e", &data, None);
        assert_eq!(rx1.try_recv().unwrap().offset, 1);
        let second = rx1.try_recv().unwrap();
        assert_eq!(second.offset, 2);
        assert_eq!(
            second.frame.as_str(),
            r#"{"push":{"channel":"c","pub":{"data":{"a":1},"offset":2}}}"#
        );
        assert!(
            slow2.is_cancelled(),
            "a full mailbox marks the session slow"
        );
        assert_eq!(hub.slow_disconnects(), 1);
        assert_eq!(hub.subscription_count(), 2);
        hub.unsubscribe("c", 1);
        hub.unsubscribe("c", 2);
        hub.unsubscribe("c", 2);
        assert_eq!(hub.subscription_count(), 0);
        assert_eq!(hub.channel_count(), 0);
    }

    #[test]
    fn a_mailbox_over_its_byte_limit_marks_the_session_slow() {
        let hub = Hub::new();
        let (tx, mut rx) = mpsc::channel(100);
        let slow = CancellationToken::new();
        let queued = Arc::new(AtomicUsize::new(0));
        hub.subscribe(
            "c",
            1,
            Subscriber {
                mailbox: tx,
                slow: slow.clone(),
                queued: queued.clone(),
                max_bytes: 250,
            },
        );
        let data = RawValue::from_string(format!("\"{}\"", "x".repeat(60))).unwrap();
        hub.publish("c", 1, "e", &data, None);
        hub.publish("c", 2, "e", &data, None);
        assert!(!slow.is_cancelled(), "two frames of ~110 bytes fit in 250");
        let frame_len = rx.try_recv().unwrap().frame.as_str().len();
        queued.fetch_sub(frame_len, Ordering::Relaxed); // what the session does when it takes one out
        hub.publish("c", 3, "e", &data, None);
        assert!(!slow.is_cancelled(), "room was made");
        hub.publish("c", 4, "e", &data, None);
        assert!(
            slow.is_cancelled(),
            "a third queued frame is over 250 bytes"
        );
        assert!(queued.load(Ordering::Relaxed) <= 250);
    }
}
