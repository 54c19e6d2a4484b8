//! The pgoutput decoder of the `wal` capture mode (`connector::capture::pgoutput::decode`): any
//! bytes the replication stream could carry are decoded or refused with an error, never a panic, an
//! unbounded allocation or a hang; what it decodes is consistent with the input.
#![no_main]

use connector::capture::pgoutput::{Message, Value, decode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(msg) = decode(data) else {
        return;
    };
    // Every column or value takes at least one byte of input: nothing is invented.
    let values = |t: &Vec<Value>| t.len();
    let count = match &msg {
        Message::Relation(r) => r.columns.len(),
        Message::Insert { new, .. } => values(new),
        Message::Update { old, new, .. } => values(new) + old.as_ref().map_or(0, |(_, t)| values(t)),
        Message::Delete { old, .. } => values(&old.1),
        Message::Truncate | Message::Other => 0,
    };
    assert!(count <= data.len(), "{count} columns from {} bytes", data.len());
    let text: usize = match &msg {
        Message::Insert { new, .. } => new
            .iter()
            .map(|v| match v {
                Value::Text(s) => s.len(),
                _ => 0,
            })
            .sum(),
        _ => 0,
    };
    assert!(text <= data.len());
});
