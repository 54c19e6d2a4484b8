//! The hub: which session is subscribed to which channel, and fan-out.
//!
//! A publication is encoded once per encoding in use on its channel into a [`Delivery`] (the whole
//! `pub` push frame: JSON for JSON subscribers, Protobuf for Protobuf ones, each only if the channel
//! has such a subscriber) and the same reference-counted bytes go to every subscriber's bounded
//! mailbox: never an encoding per subscriber. Fan-out never waits: a mailbox
//! that is full marks its session as slow (the session then closes with 3008 and the client recovers
//! from history), so one slow client never delays the others and memory stays bounded.
//!
//! Fossil delta compression: a channel with subscriptions that negotiated `delta: "fossil"` keeps
//! its previous publication, and each publication's delta against it is computed once, here, for
//! all of them (never per subscriber); such subscriptions get a full frame first (its data a JSON
//! string in JSON), then the delta frame ([`DeltaFrames`]). Channels without delta subscribers
//! keep nothing and compute nothing.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use axum::extract::ws::Utf8Bytes;
use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use serde_json::value::RawValue;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use relay_protocol::reply::{ClientInfo, DeltaPub, Encoding, Publication, Push};

/// One publication (or join/leave event), encoded once per encoding in use, shared by every
/// subscriber.
#[derive(Debug)]
pub struct Delivery {
    /// The channel.
    pub channel: Arc<str>,
    /// Offset in the channel (0: a join or leave push).
    pub offset: u64,
    /// The channel's epoch.
    pub epoch: Arc<str>,
    /// The complete push frame in JSON, if the channel has JSON subscribers.
    pub json: Option<Utf8Bytes>,
    /// The complete push frame in Protobuf, if the channel has Protobuf subscribers (delta
    /// subscribers included: their full frame in Protobuf is this one).
    pub protobuf: Option<Bytes>,
    /// The frames of delta subscribers, if the channel has any.
    pub delta: Option<DeltaFrames>,
}

/// The frames of a publication for subscriptions with fossil delta compression.
#[derive(Debug, Default)]
pub struct DeltaFrames {
    /// JSON, full: `data` is a JSON string holding the payload's JSON text (what the SDKs parse in
    /// delta mode), if the channel has JSON delta subscribers.
    pub json_full: Option<Utf8Bytes>,
    /// JSON, `delta: true`: `data` is the fossil delta against the previous publication, if it
    /// was known and the delta is shorter than the payload.
    pub json_delta: Option<Utf8Bytes>,
    /// Protobuf, `delta: true` (the full frame is [`Delivery::protobuf`]).
    pub protobuf_delta: Option<Bytes>,
}

impl Delivery {
    /// The bytes a delivery counts in the mailbox of a session in `encoding`: the longest of its
    /// frames in that encoding (0 if none was encoded: no such subscriber). The hub adds it when
    /// it queues the delivery, the session subtracts it when it takes it out, whichever frame it
    /// sends.
    pub fn frame_len(&self, encoding: Encoding) -> usize {
        let delta = self.delta.as_ref();
        match encoding {
            Encoding::Json => [
                self.json.as_ref(),
                delta.and_then(|d| d.json_full.as_ref()),
                delta.and_then(|d| d.json_delta.as_ref()),
            ]
            .into_iter()
            .flatten()
            .map(|f| f.as_str().len())
            .max()
            .unwrap_or(0),
            Encoding::Protobuf => [
                self.protobuf.as_ref(),
                delta.and_then(|d| d.protobuf_delta.as_ref()),
            ]
            .into_iter()
            .flatten()
            .map(Bytes::len)
            .max()
            .unwrap_or(0),
        }
    }
}

/// Join or leave, for [`Hub::push_join_leave`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presence {
    /// A subscription joined the channel.
    Join,
    /// A subscription left it.
    Leave,
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
    /// The session's encoding: which frame of a delivery it sends.
    pub encoding: Encoding,
}

/// A channel's subscribers on this node.
#[derive(Debug, Default)]
struct Channel {
    subs: HashMap<u64, Subscriber>,
    /// The sessions whose subscription negotiated fossil deltas.
    delta: HashSet<u64>,
    /// The channel's previous publication, kept while it has delta subscribers.
    prev: Mutex<Option<Prev>>,
}

/// A publication kept as the base of the next one's delta.
#[derive(Debug)]
struct Prev {
    offset: u64,
    epoch: Box<str>,
    data: Box<str>,
}

/// The channel registry.
#[derive(Debug, Default)]
pub struct Hub {
    channels: RwLock<HashMap<Arc<str>, Channel>>,
    next_session: AtomicU64,
    delivered: AtomicU64,
    slow_disconnects: Counter,
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

    /// Adds `session` as a subscriber of `channel` (full payloads).
    pub fn subscribe(&self, channel: &str, session: u64, subscriber: Subscriber) {
        self.subscribe_with(channel, session, subscriber, false);
    }

    /// Adds `session` as a subscriber of `channel`; with `delta`, it also gets the fossil delta
    /// frames ([`DeltaFrames`]).
    pub fn subscribe_with(&self, channel: &str, session: u64, subscriber: Subscriber, delta: bool) {
        let mut channels = self.channels.write().unwrap_or_else(|e| e.into_inner());
        let entry = channels.entry(Arc::from(channel)).or_default();
        let added = entry.subs.insert(session, subscriber).is_none();
        if delta {
            entry.delta.insert(session);
        } else {
            entry.delta.remove(&session);
        }
        if added {
            self.subscriptions.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Removes `session` from `channel`.
    pub fn unsubscribe(&self, channel: &str, session: u64) {
        let mut channels = self.channels.write().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = channels.get_mut(channel) {
            if entry.subs.remove(&session).is_some() {
                self.subscriptions.fetch_sub(1, Ordering::Relaxed);
            }
            if entry.delta.remove(&session) && entry.delta.is_empty() {
                // No delta subscriber left: the base is not kept.
                *entry.prev.get_mut().unwrap_or_else(|e| e.into_inner()) = None;
            }
            if entry.subs.is_empty() {
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
        self.slow_disconnects.get()
    }

    /// The counter of [`Hub::slow_disconnects`], for the registry ([`crate::metrics::Metrics`]).
    pub fn slow_disconnects_counter(&self) -> Counter {
        self.slow_disconnects.clone()
    }

    /// Encodes a publication once per encoding its channel's subscribers use, and hands it to every
    /// subscriber of its channel.
    pub fn publish(
        &self,
        channel: &str,
        offset: u64,
        epoch: &str,
        data: &RawValue,
        info: Option<&RawValue>,
    ) {
        let channels = self.channels.read().unwrap_or_else(|e| e.into_inner());
        let Some((name, entry)) = channels.get_key_value(channel) else {
            return;
        };
        let push = Push::Pub {
            channel,
            publication: Publication { data, offset, info },
        };
        let mut delivery = encode_for(name, offset, epoch, &push, entry);
        delivery.delta = delta_frames(channel, offset, epoch, data, info, entry);
        self.fan_out(&entry.subs, &Arc::new(delivery));
    }

    /// Hands a `join` or `leave` push to every subscriber of `channel`. It travels like a
    /// publication (same mailbox, same byte bound) with offset 0; the session passes it on only to
    /// subscriptions that asked for join/leave.
    pub fn push_join_leave(&self, channel: &str, kind: Presence, info: &ClientInfo) {
        let channels = self.channels.read().unwrap_or_else(|e| e.into_inner());
        let Some((name, entry)) = channels.get_key_value(channel) else {
            return;
        };
        let push = match kind {
            Presence::Join => Push::Join { channel, info },
            Presence::Leave => Push::Leave { channel, info },
        };
        let delivery = Arc::new(encode_for(name, 0, "", &push, entry));
        self.fan_out(&entry.subs, &delivery);
    }

    /// Channels with subscribers on this node and their subscription counts.
    pub fn channel_counts(&self) -> Vec<(String, u64)> {
        let channels = self.channels.read().unwrap_or_else(|e| e.into_inner());
        channels
            .iter()
            .map(|(name, entry)| (name.to_string(), entry.subs.len() as u64))
            .collect()
    }

    fn fan_out(&self, subs: &HashMap<u64, Subscriber>, delivery: &Arc<Delivery>) {
        let json_len = delivery.frame_len(Encoding::Json);
        let protobuf_len = delivery.frame_len(Encoding::Protobuf);
        for sub in subs.values() {
            if sub.slow.is_cancelled() {
                continue;
            }
            let len = match sub.encoding {
                Encoding::Json => json_len,
                Encoding::Protobuf => protobuf_len,
            };
            let over_bytes = sub.queued.fetch_add(len, Ordering::Relaxed) + len > sub.max_bytes;
            let sent = !over_bytes && sub.mailbox.try_send(delivery.clone()).is_ok();
            if sent {
                self.delivered.fetch_add(1, Ordering::Relaxed);
            } else {
                sub.queued.fetch_sub(len, Ordering::Relaxed);
                if !sub.mailbox.is_closed() {
                    self.slow_disconnects.inc();
                    sub.slow.cancel();
                }
            }
        }
    }
}

/// A delivery with the push encoded in each encoding that a subscriber of the channel uses (the
/// others are never encoded: a channel with only JSON subscribers costs no Protobuf encoding).
fn encode_for(
    channel: &Arc<str>,
    offset: u64,
    epoch: &str,
    push: &Push<'_>,
    entry: &Channel,
) -> Delivery {
    // JSON delta subscribers take their own full frame; Protobuf ones share the plain one.
    let (mut json, mut protobuf) = (false, false);
    for (session, sub) in &entry.subs {
        match sub.encoding {
            Encoding::Json => json |= !entry.delta.contains(session),
            Encoding::Protobuf => protobuf = true,
        }
        if json && protobuf {
            break;
        }
    }
    Delivery {
        channel: channel.clone(),
        offset,
        epoch: Arc::from(epoch),
        json: json.then(|| Utf8Bytes::from(push.to_json())),
        protobuf: protobuf.then(|| Bytes::from(push.encode(Encoding::Protobuf))),
        delta: None,
    }
}

/// The delta subscribers' frames of a publication, once for all of them: the JSON full frame, and
/// the delta against the channel's previous publication when it is the one just before (same
/// epoch, offset - 1) and the delta is shorter than the payload. Keeps this publication as the
/// next one's base; a channel without delta subscribers keeps and computes nothing.
fn delta_frames(
    channel: &str,
    offset: u64,
    epoch: &str,
    data: &RawValue,
    info: Option<&RawValue>,
    entry: &Channel,
) -> Option<DeltaFrames> {
    let mut prev = entry.prev.lock().unwrap_or_else(|e| e.into_inner());
    if entry.delta.is_empty() {
        *prev = None;
        return None;
    }
    let (mut json, mut protobuf) = (false, false);
    for session in &entry.delta {
        match entry.subs.get(session).map(|s| s.encoding) {
            Some(Encoding::Json) => json = true,
            Some(Encoding::Protobuf) => protobuf = true,
            None => {}
        }
    }
    let text = data.get();
    let full = |delta_text: &str, delta: bool, encoding: Encoding| {
        DeltaPub {
            channel,
            text: delta_text,
            offset,
            info,
            delta,
        }
        .encode(encoding)
    };
    let mut frames = DeltaFrames {
        json_full: json
            .then(|| String::from_utf8(full(text, false, Encoding::Json)).ok())
            .flatten()
            .map(Utf8Bytes::from),
        ..DeltaFrames::default()
    };
    let base = prev
        .as_ref()
        .filter(|p| p.offset + 1 == offset && &*p.epoch == epoch);
    if let Some(base) = base {
        let delta = relay_protocol::fossil::delta(base.data.as_bytes(), text);
        if delta.len() < text.len() {
            if json {
                frames.json_delta = String::from_utf8(full(&delta, true, Encoding::Json))
                    .ok()
                    .map(Utf8Bytes::from);
            }
            if protobuf {
                frames.protobuf_delta = Some(Bytes::from(full(&delta, true, Encoding::Protobuf)));
            }
        }
    }
    *prev = Some(Prev {
        offset,
        epoch: epoch.into(),
        data: text.into(),
    });
    Some(frames)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

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
                encoding: Encoding::Json,
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
                encoding: Encoding::Json,
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
            second.json.as_ref().unwrap().as_str(),
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
                encoding: Encoding::Json,
            },
        );
        let data = RawValue::from_string(format!("\"{}\"", "x".repeat(60))).unwrap();
        hub.publish("c", 1, "e", &data, None);
        hub.publish("c", 2, "e", &data, None);
        assert!(!slow.is_cancelled(), "two frames of ~110 bytes fit in 250");
        let frame_len = rx.try_recv().unwrap().frame_len(Encoding::Json);
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

    fn subscriber(encoding: Encoding) -> (Subscriber, mpsc::Receiver<Arc<Delivery>>) {
        let (tx, rx) = mpsc::channel(8);
        let sub = Subscriber {
            mailbox: tx,
            slow: CancellationToken::new(),
            queued: Arc::new(AtomicUsize::new(0)),
            max_bytes: 1 << 20,
            encoding,
        };
        (sub, rx)
    }

    #[test]
    fn each_encoding_is_made_once_and_only_when_a_subscriber_uses_it() {
        let hub = Hub::new();
        let (a, mut rx_a) = subscriber(Encoding::Json);
        let (b, mut rx_b) = subscriber(Encoding::Json);
        hub.subscribe("json-only", 1, a);
        hub.subscribe("json-only", 2, b);
        let data = RawValue::from_string("{\"a\":1}".into()).unwrap();
        hub.publish("json-only", 1, "e", &data, None);
        let (da, db) = (rx_a.try_recv().unwrap(), rx_b.try_recv().unwrap());
        assert!(Arc::ptr_eq(&da, &db), "one delivery shared by both");
        assert!(da.json.is_some());
        assert!(
            da.protobuf.is_none(),
            "no Protobuf subscriber: never encoded"
        );

        let (c, mut rx_c) = subscriber(Encoding::Json);
        let (d, mut rx_d) = subscriber(Encoding::Protobuf);
        let (e, mut rx_e) = subscriber(Encoding::Protobuf);
        hub.subscribe("mixed", 3, c);
        hub.subscribe("mixed", 4, d);
        hub.subscribe("mixed", 5, e);
        hub.publish("mixed", 1, "e", &data, None);
        let (dc, dd, de) = (
            rx_c.try_recv().unwrap(),
            rx_d.try_recv().unwrap(),
            rx_e.try_recv().unwrap(),
        );
        assert!(Arc::ptr_eq(&dc, &dd) && Arc::ptr_eq(&dd, &de));
        let pb = dd.protobuf.as_ref().unwrap();
        let reply = relay_protocol::pb::messages::Reply::decode_length_delimited(&pb[..]).unwrap();
        let push = reply.push.unwrap();
        assert_eq!(push.channel, "mixed");
        assert_eq!(&push.r#pub.unwrap().data[..], b"{\"a\":1}");
        assert_eq!(
            dc.json.as_ref().unwrap().as_str(),
            r#"{"push":{"channel":"mixed","pub":{"data":{"a":1},"offset":1}}}"#
        );

        let only_pb = ClientInfo {
            user: "u".into(),
            client: "c".into(),
            conn_info: None,
            chan_info: None,
        };
        let (f, mut rx_f) = subscriber(Encoding::Protobuf);
        hub.subscribe("pb-only", 6, f);
        hub.push_join_leave("pb-only", Presence::Join, &only_pb);
        let df = rx_f.try_recv().unwrap();
        assert_eq!(df.offset, 0);
        assert!(df.json.is_none() && df.protobuf.is_some());
    }

    #[test]
    fn deltas_are_computed_once_per_publication_for_delta_subscribers_only() {
        let hub = Hub::new();
        let (plain, mut rx_plain) = subscriber(Encoding::Json);
        let (dj, mut rx_dj) = subscriber(Encoding::Json);
        let (dp, mut rx_dp) = subscriber(Encoding::Protobuf);
        hub.subscribe("d", 1, plain);
        hub.subscribe_with("d", 2, dj, true);
        hub.subscribe_with("d", 3, dp, true);
        let body = |n: u32| {
            RawValue::from_string(format!(
                "{{\"text\":\"a long enough payload that stays the same\",\"n\":{n}}}"
            ))
            .unwrap()
        };
        hub.publish("d", 1, "e", &body(1), None);
        let first = rx_dj.try_recv().unwrap();
        assert!(Arc::ptr_eq(&first, &rx_plain.try_recv().unwrap()));
        assert!(Arc::ptr_eq(&first, &rx_dp.try_recv().unwrap()));
        let frames = first.delta.as_ref().unwrap();
        assert!(
            frames.json_delta.is_none() && frames.protobuf_delta.is_none(),
            "no base yet"
        );
        let full: serde_json::Value =
            serde_json::from_str(frames.json_full.as_ref().unwrap().as_str()).unwrap();
        assert_eq!(
            full["push"]["pub"]["data"],
            body(1).get(),
            "data as a JSON string"
        );
        hub.publish("d", 2, "e", &body(2), None);
        let second = rx_dj.try_recv().unwrap();
        let frames = second.delta.as_ref().unwrap();
        let push: serde_json::Value =
            serde_json::from_str(frames.json_delta.as_ref().unwrap().as_str()).unwrap();
        assert_eq!(push["push"]["pub"]["delta"], true);
        let delta = push["push"]["pub"]["data"].as_str().unwrap();
        assert_eq!(
            delta,
            relay_protocol::fossil::delta(body(1).get().as_bytes(), body(2).get())
        );
        let pb = relay_protocol::pb::messages::Reply::decode_length_delimited(
            &frames.protobuf_delta.as_ref().unwrap()[..],
        )
        .unwrap();
        let publication = pb.push.unwrap().r#pub.unwrap();
        assert!(publication.delta);
        assert_eq!(&publication.data[..], delta.as_bytes());
        // A gap (offset 4 after 2): no base, no delta.
        hub.publish("d", 4, "e", &body(4), None);
        assert!(
            rx_dj
                .try_recv()
                .unwrap()
                .delta
                .as_ref()
                .unwrap()
                .json_delta
                .is_none()
        );
        // Without delta subscribers the channel keeps and computes nothing.
        hub.unsubscribe("d", 2);
        hub.unsubscribe("d", 3);
        hub.publish("d", 5, "e", &body(5), None);
        let last = std::iter::from_fn(|| rx_plain.try_recv().ok())
            .last()
            .unwrap();
        assert_eq!(last.offset, 5);
        assert!(last.delta.is_none());
    }
}
