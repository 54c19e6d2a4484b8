//! Fossil delta encoding (the format the Centrifugo SDKs apply for `delta: "fossil"`), written from
//! the format's published description:
//!
//! - a header: the target's length as a base-64 integer, then `\n`;
//! - commands: `N@O,` copies N bytes of the source from offset O; `N:` followed by N bytes inserts
//!   those bytes literally;
//! - a trailer: `C;` where C is the 32-bit checksum of the target (the wrapping sum of its
//!   big-endian 32-bit words, the last one padded with zero bytes).
//!
//! Integers use the digits `0-9 A-Z _ a-z ~` (values 0 to 63), most significant first.
//!
//! The encoder indexes the source by blocks of [`BLOCK`] bytes and looks each target position up,
//! extending a hit both ways. Copies begin and end on UTF-8 character boundaries of the target, so
//! every literal run is whole characters: the delta of UTF-8 text is UTF-8 text (it can travel as
//! a JSON string).

use std::collections::HashMap;

/// The length of the source blocks that are indexed; shorter matches are sent literally.
const BLOCK: usize = 16;

const DIGITS: &[u8; 64] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz~";

fn put_int(out: &mut String, mut v: u64) {
    let mut buf = [0u8; 11];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = DIGITS[(v & 63) as usize];
        v >>= 6;
        if v == 0 {
            break;
        }
    }
    // The digits are ASCII.
    out.extend(buf[i..].iter().map(|&b| b as char));
}

/// The format's checksum of `bytes`: the wrapping sum of their big-endian 32-bit words, the last
/// one padded with zeros.
pub fn checksum(bytes: &[u8]) -> u32 {
    bytes.chunks(4).fold(0u32, |sum, chunk| {
        let mut word = [0u8; 4];
        word[..chunk.len()].copy_from_slice(chunk);
        sum.wrapping_add(u32::from_be_bytes(word))
    })
}

fn is_boundary(text: &[u8], i: usize) -> bool {
    i == 0 || i >= text.len() || (text[i] & 0xC0) != 0x80
}

/// The fossil delta that turns `source` into `target`.
pub fn delta(source: &[u8], target: &str) -> String {
    let t = target.as_bytes();
    let mut out = String::with_capacity(t.len() / 4 + 16);
    put_int(&mut out, t.len() as u64);
    out.push('\n');
    let mut index: HashMap<&[u8], usize> = HashMap::new();
    if source.len() >= BLOCK {
        for start in (0..=source.len() - BLOCK).step_by(BLOCK) {
            index.entry(&source[start..start + BLOCK]).or_insert(start);
        }
    }
    let mut literal_from = 0; // the first target byte not yet sent
    let mut i = 0;
    while !index.is_empty() && i + BLOCK <= t.len() {
        let Some(&s) = index.get(&t[i..i + BLOCK]) else {
            i += 1;
            continue;
        };
        // Extend the match backwards over the pending literal, and forwards.
        let (mut ts, mut ss) = (i, s);
        while ts > literal_from && ss > 0 && t[ts - 1] == source[ss - 1] {
            ts -= 1;
            ss -= 1;
        }
        let (mut te, mut se) = (i + BLOCK, s + BLOCK);
        while te < t.len() && se < source.len() && t[te] == source[se] {
            te += 1;
            se += 1;
        }
        // Whole characters only: the copy starts and ends on character boundaries.
        while !is_boundary(t, ts) && ts < te {
            ts += 1;
            ss += 1;
        }
        while !is_boundary(t, te) && te > ts {
            te -= 1;
        }
        if te - ts < BLOCK {
            i += 1;
            continue;
        }
        if ts > literal_from {
            put_int(&mut out, (ts - literal_from) as u64);
            out.push(':');
            out.push_str(&target[literal_from..ts]);
        }
        put_int(&mut out, (te - ts) as u64);
        out.push('@');
        put_int(&mut out, ss as u64);
        out.push(',');
        literal_from = te;
        i = te;
    }
    if literal_from < t.len() {
        put_int(&mut out, (t.len() - literal_from) as u64);
        out.push(':');
        out.push_str(&target[literal_from..]);
    }
    put_int(&mut out, u64::from(checksum(t)));
    out.push(';');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An applier written from the format description, to check the encoder's output.
    fn apply(source: &[u8], delta: &[u8]) -> Vec<u8> {
        let mut pos = 0;
        let int = |pos: &mut usize| {
            let mut v: u64 = 0;
            while let Some(d) = DIGITS.iter().position(|&c| Some(&c) == delta.get(*pos)) {
                v = (v << 6) | d as u64;
                *pos += 1;
            }
            v as usize
        };
        let len = int(&mut pos);
        assert_eq!(delta[pos], b'\n');
        pos += 1;
        let mut out = Vec::new();
        loop {
            let n = int(&mut pos);
            let op = delta[pos];
            pos += 1;
            match op {
                b'@' => {
                    let o = int(&mut pos);
                    assert_eq!(delta[pos], b',');
                    pos += 1;
                    out.extend_from_slice(&source[o..o + n]);
                }
                b':' => {
                    out.extend_from_slice(&delta[pos..pos + n]);
                    pos += n;
                }
                b';' => {
                    assert_eq!(n as u32, checksum(&out), "checksum");
                    assert_eq!(out.len(), len, "length");
                    assert_eq!(pos, delta.len());
                    return out;
                }
                other => panic!("bad op {other}"),
            }
        }
    }

    #[test]
    fn deltas_reproduce_the_target() {
        let base =
            r#"{"user":"alice","text":"hello there, this is a fairly long message body","n":1}"#;
        let cases = [
            (base, base.replace("\"n\":1", "\"n\":2")),
            (base, format!("{base}{base}")),
            ("", base.to_owned()),
            (base, String::new()),
            (base, "{\"x\":\"совсем другое\"}".to_owned()),
            (
                "{\"t\":\"ééééééééééééééééééééééééééééééé\"}",
                "{\"t\":\"aééééééééééééééééééééééééééééééé!\"}".to_owned(),
            ),
        ];
        for (source, target) in cases {
            let d = delta(source.as_bytes(), &target);
            assert_eq!(apply(source.as_bytes(), d.as_bytes()), target.as_bytes());
        }
        let small_change = delta(base.as_bytes(), &base.replace("alice", "bob"));
        assert!(small_change.len() < base.len() / 2, "{small_change}");
    }

    #[test]
    fn integers_and_checksum() {
        let mut s = String::new();
        put_int(&mut s, 0);
        put_int(&mut s, 64);
        put_int(&mut s, 63);
        assert_eq!(s, "010~");
        assert_eq!(checksum(b"\x00\x00\x00\x01\x02"), 1 + 0x0200_0000);
    }
}
