//! Frames on the wire: a JSON connection gets text frames of `\n`-separated lines, a Protobuf one
//! binary frames of length-delimited messages; writes are bounded in time.

#[allow(clippy::wildcard_imports)]
use super::*;

/// The frame of a hub delivery in `encoding` (the hub encoded it for every encoding its
/// subscribers use, so it is there).
pub(super) fn frame(frames: &Frames, encoding: Encoding) -> Option<Message> {
    match encoding {
        Encoding::Json => frames.json.clone().map(Message::Text),
        Encoding::Protobuf => frames.protobuf.clone().map(Message::Binary),
    }
}

/// Encoded messages joined into one WebSocket message: a text frame of JSON lines, or a binary
/// frame of length-delimited Protobuf messages.
pub(super) fn message(encoding: Encoding, messages: Vec<u8>) -> Message {
    match encoding {
        Encoding::Json => match String::from_utf8(messages) {
            Ok(text) => Message::Text(Utf8Bytes::from(text)),
            // The JSON encoders produce UTF-8 only.
            Err(_) => Message::Text(Utf8Bytes::from_static(reply::PING)),
        },
        Encoding::Protobuf => Message::Binary(Bytes::from(messages)),
    }
}

/// Writes replies as one frame. A socket that does not take the bytes within `limit` is a dead or
/// stalled peer: the write fails and the session ends (its mailbox stays bounded meanwhile).
pub(super) async fn send_lines<B: AsRef<[u8]>>(
    sink: &mut (impl futures_util::Sink<Message, Error = axum::Error> + Unpin),
    encoding: Encoding,
    lines: &[B],
    limit: Duration,
) -> Result<(), axum::Error> {
    let frame = message(encoding, encoding.join(lines));
    match tokio::time::timeout(limit, sink.send(frame)).await {
        Ok(r) => r,
        Err(_) => Err(axum::Error::new(std::io::Error::from(
            std::io::ErrorKind::TimedOut,
        ))),
    }
}

/// Writes pushes (one frame each, shared bytes) with a single flush, within `limit`.
pub(super) async fn feed_all(
    sink: &mut (impl futures_util::Sink<Message, Error = axum::Error> + Unpin),
    frames: Vec<Message>,
    limit: Duration,
) -> Result<(), axum::Error> {
    if frames.is_empty() {
        return Ok(());
    }
    let write = async {
        for frame in frames {
            sink.feed(frame).await?;
        }
        sink.flush().await
    };
    match tokio::time::timeout(limit, write).await {
        Ok(r) => r,
        Err(_) => Err(axum::Error::new(std::io::Error::from(
            std::io::ErrorKind::TimedOut,
        ))),
    }
}
