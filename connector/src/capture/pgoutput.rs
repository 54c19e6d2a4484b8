//! A decoder for the pgoutput messages (protocol version 1) that the replication client passes on
//! undecoded: Relation, Type, Origin, Insert, Update, Delete and Truncate. (Begin, Commit and
//! logical-decoding messages arrive already parsed from `pgwire-replication`.)
//!
//! Small on purpose (the wire format is documented in PostgreSQL's "Logical Replication Message
//! Formats"), total over any input: a malformed message is an error, never a panic, so it can be
//! fuzzed. Column values stay in PostgreSQL's text format; the leader lets PostgreSQL type them.

use std::fmt;

/// A decoded message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// The description of a table, sent before its first change in a session and after it changes.
    Relation(Relation),
    /// An insert: the new row.
    Insert {
        /// The table's OID.
        relation: u32,
        /// The new row.
        new: Tuple,
    },
    /// An update: the old row (only with `REPLICA IDENTITY FULL`, or its key when the key changed)
    /// and the new row.
    Update {
        /// The table's OID.
        relation: u32,
        /// The old row (`O`, with `REPLICA IDENTITY FULL`) or key (`K`).
        old: Option<(OldKind, Tuple)>,
        /// The new row.
        new: Tuple,
    },
    /// A delete: the old row (with `REPLICA IDENTITY FULL`) or its key.
    Delete {
        /// The table's OID.
        relation: u32,
        /// The old row or key.
        old: (OldKind, Tuple),
    },
    /// A truncate (not published: row triggers do not see it either).
    Truncate,
    /// A type description or a replication origin: nothing the relay needs.
    Other,
}

/// What an old tuple holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OldKind {
    /// The replica identity key columns only (others are null).
    Key,
    /// The whole old row (`REPLICA IDENTITY FULL`).
    Full,
}

/// A table description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// The table's OID.
    pub id: u32,
    /// Its schema (`pg_catalog` is sent as the empty string).
    pub schema: String,
    /// Its name.
    pub name: String,
    /// `d` (default), `n` (nothing), `f` (full) or `i` (index).
    pub replica_identity: u8,
    /// Column names, in the order tuples carry them.
    pub columns: Vec<String>,
}

/// One column value of a tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// A TOASTed value that did not change (the new tuple of an UPDATE does not carry it).
    UnchangedToast,
    /// The value in PostgreSQL's text format.
    Text(String),
}

/// A row: its values in the relation's column order.
pub type Tuple = Vec<Value>;

/// Why a message could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError(pub String);

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pgoutput: {}", self.0)
    }
}

impl std::error::Error for DecodeError {}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError(format!(
                "truncated: wanted {n} bytes, {} left",
                self.buf.len()
            )));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn cstr(&mut self) -> Result<String, DecodeError> {
        let end = self
            .buf
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| DecodeError("unterminated string".into()))?;
        let s = std::str::from_utf8(&self.buf[..end])
            .map_err(|_| DecodeError("string is not UTF-8".into()))?
            .to_owned();
        self.buf = &self.buf[end + 1..];
        Ok(s)
    }

    fn tuple(&mut self) -> Result<Tuple, DecodeError> {
        let n = self.u16()?;
        // Each column takes at least one byte: a count larger than what is left is malformed (and
        // must not reserve memory for it).
        if usize::from(n) > self.buf.len() {
            return Err(DecodeError(format!("tuple of {n} columns is truncated")));
        }
        let mut values = Vec::with_capacity(n.into());
        for _ in 0..n {
            values.push(match self.u8()? {
                b'n' => Value::Null,
                b'u' => Value::UnchangedToast,
                b't' => {
                    let len = usize::try_from(self.u32()?)
                        .map_err(|_| DecodeError("value length".into()))?;
                    let bytes = self.take(len)?;
                    Value::Text(
                        std::str::from_utf8(bytes)
                            .map_err(|_| DecodeError("text value is not UTF-8".into()))?
                            .to_owned(),
                    )
                }
                b'b' => return Err(DecodeError("binary values are not requested".into())),
                k => return Err(DecodeError(format!("unknown value kind {k:#04x}"))),
            });
        }
        Ok(values)
    }

    fn old(&mut self, kind: u8) -> Result<(OldKind, Tuple), DecodeError> {
        let kind = match kind {
            b'K' => OldKind::Key,
            b'O' => OldKind::Full,
            k => return Err(DecodeError(format!("unknown old-tuple kind {k:#04x}"))),
        };
        Ok((kind, self.tuple()?))
    }
}

/// Decodes one pgoutput message (the payload of an `XLogData`).
pub fn decode(data: &[u8]) -> Result<Message, DecodeError> {
    let mut r = Reader { buf: data };
    let tag = r.u8()?;
    let msg = match tag {
        b'R' => {
            let id = r.u32()?;
            let schema = r.cstr()?;
            let name = r.cstr()?;
            let replica_identity = r.u8()?;
            let n = r.u16()?;
            if usize::from(n) > r.buf.len() {
                return Err(DecodeError(format!("relation of {n} columns is truncated")));
            }
            let mut columns = Vec::with_capacity(n.into());
            for _ in 0..n {
                let _flags = r.u8()?;
                columns.push(r.cstr()?);
                let _type_oid = r.u32()?;
                let _type_modifier = r.u32()?;
            }
            Message::Relation(Relation {
                id,
                schema,
                name,
                replica_identity,
                columns,
            })
        }
        b'I' => {
            let relation = r.u32()?;
            match r.u8()? {
                b'N' => Message::Insert {
                    relation,
                    new: r.tuple()?,
                },
                k => return Err(DecodeError(format!("insert: unexpected {k:#04x}"))),
            }
        }
        b'U' => {
            let relation = r.u32()?;
            let mut kind = r.u8()?;
            let old = if kind == b'K' || kind == b'O' {
                let old = r.old(kind)?;
                kind = r.u8()?;
                Some(old)
            } else {
                None
            };
            if kind != b'N' {
                return Err(DecodeError(format!("update: unexpected {kind:#04x}")));
            }
            Message::Update {
                relation,
                old,
                new: r.tuple()?,
            }
        }
        b'D' => {
            let relation = r.u32()?;
            let kind = r.u8()?;
            Message::Delete {
                relation,
                old: r.old(kind)?,
            }
        }
        b'T' => Message::Truncate,
        b'Y' | b'O' => Message::Other,
        t => return Err(DecodeError(format!("unknown message type {t:#04x}"))),
    };
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tuple(values: &[Option<&str>]) -> Vec<u8> {
        let mut b = (values.len() as u16).to_be_bytes().to_vec();
        for v in values {
            match v {
                None => b.push(b'n'),
                Some(s) => {
                    b.push(b't');
                    b.extend((s.len() as u32).to_be_bytes());
                    b.extend(s.as_bytes());
                }
            }
        }
        b
    }

    #[test]
    fn decodes_relation_and_changes() {
        let mut rel = vec![b'R'];
        rel.extend(16385u32.to_be_bytes());
        rel.extend(b"public\0chat\0f");
        rel.extend(2u16.to_be_bytes());
        for name in ["id", "body"] {
            rel.push(1);
            rel.extend(name.as_bytes());
            rel.push(0);
            rel.extend(23u32.to_be_bytes());
            rel.extend((-1i32).to_be_bytes());
        }
        let Message::Relation(r) = decode(&rel).unwrap() else {
            panic!("not a relation")
        };
        assert_eq!(
            (r.id, r.schema.as_str(), r.name.as_str(), r.replica_identity),
            (16385, "public", "chat", b'f')
        );
        assert_eq!(r.columns, ["id", "body"]);

        let mut upd = vec![b'U'];
        upd.extend(16385u32.to_be_bytes());
        upd.push(b'O');
        upd.extend(tuple(&[Some("1"), Some("old")]));
        upd.push(b'N');
        upd.extend(tuple(&[Some("1"), None]));
        assert_eq!(
            decode(&upd).unwrap(),
            Message::Update {
                relation: 16385,
                old: Some((
                    OldKind::Full,
                    vec![Value::Text("1".into()), Value::Text("old".into())]
                )),
                new: vec![Value::Text("1".into()), Value::Null],
            }
        );
        let mut del = vec![b'D'];
        del.extend(16385u32.to_be_bytes());
        del.push(b'K');
        del.extend(tuple(&[Some("1"), None]));
        assert!(matches!(
            decode(&del).unwrap(),
            Message::Delete {
                old: (OldKind::Key, _),
                ..
            }
        ));
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        let mut ins = vec![b'I'];
        ins.extend(1u32.to_be_bytes());
        ins.push(b'N');
        ins.extend(tuple(&[Some("hello")]));
        assert!(decode(&ins).is_ok());
        for cut in 0..ins.len() {
            assert!(decode(&ins[..cut]).is_err(), "prefix of {cut} bytes");
        }
        // A huge column count in a tiny message.
        assert!(decode(&[b'I', 0, 0, 0, 1, b'N', 0xff, 0xff]).is_err());
        assert!(decode(b"Z").is_err());
        // Pseudo-random bytes never panic.
        let mut x: u32 = 12345;
        for _ in 0..20_000 {
            let len = (x % 40) as usize;
            let mut buf = Vec::with_capacity(len);
            for _ in 0..len {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                buf.push((x >> 16) as u8);
            }
            if let Some(first) = buf.first_mut() {
                *first = b"RIUDTYO"[(x % 7) as usize];
            }
            let _ = decode(&buf);
        }
    }
}
