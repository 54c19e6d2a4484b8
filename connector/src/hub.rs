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

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::Poll;

use axum::extract::ws::Utf8Bytes;
use bytes::Bytes;
use futures_util::task::AtomicWaker;
use prometheus_client::metrics::counter::Counter;
use serde_json::value::RawValue;

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

/// A session as the hub sees it: its mailbox (which also carries its encoding, byte bound and slow
/// mark).
#[derive(Debug, Clone)]
pub struct Subscriber {
    /// The session's bounded mailbox.
    pub mailbox: Arc<Mailbox>,
    /// The session's encoding: which frame of a delivery it sends (the mailbox's, copied here so
    /// fan-out reads it without following the pointer).
    pub encoding: Encoding,
}

impl Subscriber {
    /// The subscriber whose deliveries go to `mailbox`.
    pub fn of(mailbox: &Arc<Mailbox>) -> Self {
        Self {
            mailbox: mailbox.clone(),
            encoding: mailbox.encoding,
        }
    }
}

/// The mailbox is marked slow.
const SLOW: u8 = 1;
/// The session has ended: nothing more is accepted, and a refusal does not mark it slow.
const CLOSED: u8 = 2;

/// A session's bounded mailbox: the hub adds deliveries, the session takes them out. Bounded by
/// a number of deliveries (`client.outbound_queue`) and by the bytes of their frames
/// (`client.outbound_queue_bytes`, which the session's replies being written also count against).
/// A delivery that does not fit marks the mailbox slow, which wakes the session to close with 3008.
///
/// One allocation per session, of about 100 bytes while empty: a queue under a short
/// `std::sync::Mutex` (never held across `.await`) and the session task's waker. (A tokio `mpsc`
/// channel, with a `CancellationToken` for the slow mark and an `Arc` for the byte count, took
/// about 1 KiB per connection: cache-padded counters and a first block of 32 slots.)
#[derive(Debug)]
pub struct Mailbox {
    queue: Mutex<VecDeque<Arc<Delivery>>>,
    /// The most deliveries it holds.
    capacity: usize,
    /// The most bytes of frames it (and the replies being written) may hold.
    max_bytes: usize,
    /// Bytes of frames in the mailbox, plus those of replies being written.
    queued: AtomicUsize,
    /// [`SLOW`] and [`CLOSED`].
    flags: AtomicU8,
    /// The session task, woken by a delivery or the slow mark.
    waker: AtomicWaker,
    /// The session's encoding.
    encoding: Encoding,
}

/// A queue keeps at most this capacity once emptied (a burst's larger one is given back).
const KEPT_CAPACITY: usize = 64;

impl Mailbox {
    /// An empty mailbox of at most `capacity` deliveries and `max_bytes` bytes, for a session in
    /// `encoding`.
    pub fn new(capacity: usize, max_bytes: usize, encoding: Encoding) -> Self {
        Self {
            queue: Mutex::new(VecDeque::new()),
            capacity,
            max_bytes,
            queued: AtomicUsize::new(0),
            flags: AtomicU8::new(0),
            waker: AtomicWaker::new(),
            encoding,
        }
    }

    /// Adds `delivery`, whose frame in this mailbox's encoding is `len` bytes. Refused (false) if
    /// the mailbox is full, over its bytes, or closed; the caller then marks it slow unless closed.
    fn offer(&self, delivery: &Arc<Delivery>, len: usize) -> bool {
        if self.queued.fetch_add(len, Ordering::Relaxed) + len > self.max_bytes {
            self.queued.fetch_sub(len, Ordering::Relaxed);
            return false;
        }
        {
            let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            // Checked under the lock: `close` sets it under the same lock, so nothing is added to
            // a mailbox after its session emptied it for good.
            if queue.len() >= self.capacity || self.is_closed() {
                drop(queue);
                self.queued.fetch_sub(len, Ordering::Relaxed);
                return false;
            }
            queue.push_back(delivery.clone());
        }
        self.waker.wake();
        true
    }

    /// Marks the mailbox slow and wakes its session; true if it was not marked already (and not
    /// closed: a session that ended is not slow).
    fn mark_slow(&self) -> bool {
        let before = self.flags.fetch_or(SLOW, Ordering::AcqRel);
        if before != 0 {
            return false;
        }
        self.waker.wake();
        true
    }

    /// Whether the mailbox is marked slow.
    pub fn is_slow(&self) -> bool {
        self.flags.load(Ordering::Acquire) & SLOW != 0
    }

    /// Whether its session has ended.
    pub fn is_closed(&self) -> bool {
        self.flags.load(Ordering::Acquire) & CLOSED != 0
    }

    /// Ends the mailbox (its session is leaving): what it holds is dropped and nothing more is
    /// accepted.
    pub fn close(&self) {
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        self.flags.fetch_or(CLOSED, Ordering::AcqRel);
        *queue = VecDeque::new();
        self.queued.store(0, Ordering::Relaxed);
    }

    /// Bytes of frames waiting in the mailbox, plus those of replies being written.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Counts `bytes` more against the byte bound (replies being written).
    pub fn hold(&self, bytes: usize) {
        self.queued.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Gives back `bytes` counted by [`hold`](Self::hold), or of a delivery taken out.
    pub fn release(&self, bytes: usize) {
        self.queued.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// Completes when the mailbox is marked slow.
    pub fn slow(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(|cx| {
            if self.is_slow() {
                return Poll::Ready(());
            }
            self.waker.register(cx.waker());
            if self.is_slow() {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
    }

    /// Takes out the oldest delivery, waiting for one. (The session subtracts its bytes with
    /// [`release`](Self::release) when it handles it.)
    pub fn recv(&self) -> impl Future<Output = Arc<Delivery>> + '_ {
        std::future::poll_fn(|cx| {
            if let Some(d) = self.try_recv() {
                return Poll::Ready(d);
            }
            self.waker.register(cx.waker());
            match self.try_recv() {
                Some(d) => Poll::Ready(d),
                None => Poll::Pending,
            }
        })
    }

    /// Takes out the oldest delivery, if any.
    pub fn try_recv(&self) -> Option<Arc<Delivery>> {
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let d = queue.pop_front();
        if queue.is_empty() && queue.capacity() > KEPT_CAPACITY {
            // A burst grew it: an idle session keeps a small queue.
            *queue = VecDeque::new();
        }
        d
    }
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
            let mailbox = &*sub.mailbox;
            if mailbox.is_slow() {
                continue;
            }
            let len = match sub.encoding {
                Encoding::Json => json_len,
                Encoding::Protobuf => protobuf_len,
            };
            if mailbox.offer(delivery, len) {
                self.delivered.fetch_add(1, Ordering::Relaxed);
            } else if !mailbox.is_closed() && mailbox.mark_slow() {
                self.slow_disconnects.inc();
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
        let rx1 = Arc::new(Mailbox::new(8, 1 << 20, Encoding::Json));
        let rx2 = Arc::new(Mailbox::new(1, 1 << 20, Encoding::Json));
        hub.subscribe("c", 1, Subscriber::of(&rx1));
        hub.subscribe("c", 2, Subscriber::of(&rx2));
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
        assert!(rx2.is_slow(), "a full mailbox marks the session slow");
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
        let rx = Arc::new(Mailbox::new(100, 250, Encoding::Json));
        hub.subscribe("c", 1, Subscriber::of(&rx));
        let data = RawValue::from_string(format!("\"{}\"", "x".repeat(60))).unwrap();
        hub.publish("c", 1, "e", &data, None);
        hub.publish("c", 2, "e", &data, None);
        assert!(!rx.is_slow(), "two frames of ~110 bytes fit in 250");
        let frame_len = rx.try_recv().unwrap().frame_len(Encoding::Json);
        rx.release(frame_len); // what the session does when it takes one out
        hub.publish("c", 3, "e", &data, None);
        assert!(!rx.is_slow(), "room was made");
        hub.publish("c", 4, "e", &data, None);
        assert!(rx.is_slow(), "a third queued frame is over 250 bytes");
        assert!(rx.queued() <= 250);
    }

    fn subscriber(encoding: Encoding) -> (Subscriber, Arc<Mailbox>) {
        let rx = Arc::new(Mailbox::new(8, 1 << 20, encoding));
        (Subscriber::of(&rx), rx)
    }

    #[test]
    fn a_closed_mailbox_refuses_without_marking_slow() {
        let hub = Hub::new();
        let (sub, rx) = subscriber(Encoding::Json);
        hub.subscribe("c", 1, sub);
        let data = RawValue::from_string("1".into()).unwrap();
        hub.publish("c", 1, "e", &data, None);
        rx.close();
        hub.publish("c", 2, "e", &data, None);
        assert!(rx.try_recv().is_none(), "closing drops what it held");
        assert!(!rx.is_slow());
        assert_eq!(hub.slow_disconnects(), 0);
        assert_eq!(rx.queued(), 0, "the refused frame is not counted");
    }

    #[test]
    fn an_emptied_mailbox_gives_back_a_burst_s_capacity() {
        let hub = Hub::new();
        let rx = Arc::new(Mailbox::new(1000, 1 << 20, Encoding::Json));
        hub.subscribe("c", 1, Subscriber::of(&rx));
        let data = RawValue::from_string("1".into()).unwrap();
        for offset in 1..=500 {
            hub.publish("c", offset, "e", &data, None);
        }
        for offset in 1..=500 {
            assert_eq!(rx.try_recv().unwrap().offset, offset, "in order");
        }
        assert!(rx.try_recv().is_none());
        let capacity = rx.queue.lock().unwrap().capacity();
        assert!(capacity <= KEPT_CAPACITY, "kept {capacity}");
    }

    #[test]
    fn each_encoding_is_made_once_and_only_when_a_subscriber_uses_it() {
        let hub = Hub::new();
        let (a, rx_a) = subscriber(Encoding::Json);
        let (b, rx_b) = subscriber(Encoding::Json);
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

        let (c, rx_c) = subscriber(Encoding::Json);
        let (d, rx_d) = subscriber(Encoding::Protobuf);
        let (e, rx_e) = subscriber(Encoding::Protobuf);
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
        let (f, rx_f) = subscriber(Encoding::Protobuf);
        hub.subscribe("pb-only", 6, f);
        hub.push_join_leave("pb-only", Presence::Join, &only_pb);
        let df = rx_f.try_recv().unwrap();
        assert_eq!(df.offset, 0);
        assert!(df.json.is_none() && df.protobuf.is_some());
    }

    #[test]
    fn deltas_are_computed_once_per_publication_for_delta_subscribers_only() {
        let hub = Hub::new();
        let (plain, rx_plain) = subscriber(Encoding::Json);
        let (dj, rx_dj) = subscriber(Encoding::Json);
        let (dp, rx_dp) = subscriber(Encoding::Protobuf);
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
        let last = std::iter::from_fn(|| rx_plain.try_recv()).last().unwrap();
        assert_eq!(last.offset, 5);
        assert!(last.delta.is_none());
    }
}
