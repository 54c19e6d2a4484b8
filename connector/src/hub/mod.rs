//! The hub: which session is subscribed to which channel, fan-out, and which sessions a user has.
//!
//! A publication is encoded once per encoding in use on its channel into a [`Delivery`] (the whole
//! `pub` push frame: JSON for JSON subscribers, Protobuf for Protobuf ones, each only if the channel
//! has such a subscriber) and the same reference-counted bytes go to every subscriber's bounded
//! mailbox: never an encoding per subscriber. Fan-out never waits: a mailbox
//! that is full marks its session as slow (the session then closes with 3008 and the client recovers
//! from history), so one slow client never delays the others and memory stays bounded. Join and
//! leave pushes travel the same way, as their own kinds of [`Delivery`].
//!
//! Fossil delta compression: a channel with subscriptions that negotiated `delta: "fossil"` keeps
//! its previous publication, and each publication's delta against it is computed once, here, for
//! all of them (never per subscriber); such subscriptions get a full frame first (its data a JSON
//! string in JSON), then the delta frame ([`DeltaFrames`]). Channels without delta subscribers
//! keep nothing and compute nothing.
//!
//! Connected sessions are also indexed by user (`sessions.rs`), so a `disconnect` order, from the
//! server API of any node, closes the connections it names ([`Hub::disconnect`]).
//!
//! `mailbox.rs` holds a session's bounded mailbox, `delivery.rs` what goes into it and how it is
//! encoded once.

mod delivery;
mod mailbox;
mod sessions;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use prometheus_client::metrics::counter::Counter;
use serde_json::value::RawValue;

use relay_protocol::reply::{ClientInfo, Encoding, Publication, Push};

pub(crate) use delivery::{Delivery, DeltaFrames, Frames};
pub(crate) use mailbox::{Mailbox, Subscriber};
pub(crate) use sessions::Registration;

use delivery::{delta_frames, encode_for};

/// Join or leave, for [`Hub::push_join_leave`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinLeave {
    /// A subscription joined the channel.
    Join,
    /// A subscription left it.
    Leave,
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

/// The channel registry, and the sessions by user.
#[derive(Debug, Default)]
pub struct Hub {
    channels: RwLock<HashMap<Arc<str>, Channel>>,
    sessions: sessions::Sessions,
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
        let delivery = Delivery::Publication {
            offset,
            epoch: Arc::from(epoch),
            frames: encode_for(name, &push, entry),
            delta: delta_frames(channel, offset, epoch, data, info, entry),
        };
        self.fan_out(&entry.subs, &Arc::new(delivery));
    }

    /// Hands a `join` or `leave` push to every subscriber of `channel`. It travels like a
    /// publication (same mailbox, same byte bound); the session passes it on only to subscriptions
    /// that asked for join/leave.
    pub fn push_join_leave(&self, channel: &str, kind: JoinLeave, info: &ClientInfo) {
        let channels = self.channels.read().unwrap_or_else(|e| e.into_inner());
        let Some((name, entry)) = channels.get_key_value(channel) else {
            return;
        };
        let delivery = match kind {
            JoinLeave::Join => {
                Delivery::Join(encode_for(name, &Push::Join { channel, info }, entry))
            }
            JoinLeave::Leave => {
                Delivery::Leave(encode_for(name, &Push::Leave { channel, info }, entry))
            }
        };
        self.fan_out(&entry.subs, &Arc::new(delivery));
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
