//! What the hub hands to a session's mailbox: a publication or a join/leave push, each encoded once
//! per encoding in use on its channel and shared by every subscriber.

use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;
use bytes::Bytes;
use serde_json::value::RawValue;

use relay_protocol::reply::{DeltaPub, Encoding, Push};

use super::{Channel, Prev};

/// One push for the subscribers of a channel, encoded once per encoding in use, shared by every
/// subscriber.
#[derive(Debug)]
pub enum Delivery {
    /// A publication of the channel's stream, at `offset` in `epoch` (each subscription checks it
    /// is the next one).
    Publication {
        /// Offset in the channel.
        offset: u64,
        /// The channel's epoch.
        epoch: Arc<str>,
        /// The `pub` push.
        frames: Frames,
        /// The frames of delta subscribers, if the channel has any.
        delta: Option<DeltaFrames>,
    },
    /// A `join` push: a subscription joined the channel's presence (for subscriptions that asked
    /// for join/leave).
    Join(Frames),
    /// A `leave` push: a subscription left the channel's presence.
    Leave(Frames),
}

/// A push of a channel in each encoding its subscribers use.
#[derive(Debug)]
pub struct Frames {
    /// The channel.
    pub channel: Arc<str>,
    /// The complete push frame in JSON, if the channel has JSON subscribers.
    pub json: Option<Utf8Bytes>,
    /// The complete push frame in Protobuf, if the channel has Protobuf subscribers (delta
    /// subscribers included: their full frame in Protobuf is this one).
    pub protobuf: Option<Bytes>,
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
    /// Protobuf, `delta: true` (the full frame is [`Frames::protobuf`]).
    pub protobuf_delta: Option<Bytes>,
}

impl Delivery {
    /// The push frames (of a publication: the plain ones).
    pub fn frames(&self) -> &Frames {
        match self {
            Self::Publication { frames, .. } | Self::Join(frames) | Self::Leave(frames) => frames,
        }
    }

    /// The channel.
    pub fn channel(&self) -> &Arc<str> {
        &self.frames().channel
    }

    /// The bytes a delivery counts in the mailbox of a session in `encoding`: the longest of its
    /// frames in that encoding (0 if none was encoded: no such subscriber). The hub adds it when
    /// it queues the delivery, the session subtracts it when it takes it out, whichever frame it
    /// sends.
    pub fn frame_len(&self, encoding: Encoding) -> usize {
        let frames = self.frames();
        let delta = match self {
            Self::Publication { delta, .. } => delta.as_ref(),
            Self::Join(_) | Self::Leave(_) => None,
        };
        match encoding {
            Encoding::Json => [
                frames.json.as_ref(),
                delta.and_then(|d| d.json_full.as_ref()),
                delta.and_then(|d| d.json_delta.as_ref()),
            ]
            .into_iter()
            .flatten()
            .map(|f| f.as_str().len())
            .max()
            .unwrap_or(0),
            Encoding::Protobuf => [
                frames.protobuf.as_ref(),
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

/// A push encoded in each encoding that a subscriber of the channel uses (the others are never
/// encoded: a channel with only JSON subscribers costs no Protobuf encoding). A publication's JSON
/// delta subscribers take their own full frame ([`delta_frames`]), so they need no plain JSON one; a
/// join or leave push has no such frame and goes to them plain.
pub(super) fn encode_for(channel: &Arc<str>, push: &Push<'_>, entry: &Channel) -> Frames {
    let delta_framed = matches!(push, Push::Pub { .. });
    // Protobuf delta subscribers always share the plain frame.
    let (mut json, mut protobuf) = (false, false);
    for (session, sub) in &entry.subs {
        match sub.encoding {
            Encoding::Json => json |= !(delta_framed && entry.delta.contains(session)),
            Encoding::Protobuf => protobuf = true,
        }
        if json && protobuf {
            break;
        }
    }
    Frames {
        channel: channel.clone(),
        json: json.then(|| Utf8Bytes::from(push.to_json())),
        protobuf: protobuf.then(|| Bytes::from(push.encode(Encoding::Protobuf))),
    }
}

/// The delta subscribers' frames of a publication, once for all of them: the JSON full frame, and
/// the delta against the channel's previous publication when it is the one just before (same
/// epoch, offset - 1) and the delta is shorter than the payload. Keeps this publication as the
/// next one's base; a channel without delta subscribers keeps and computes nothing.
pub(super) fn delta_frames(
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
