//! The on-disk encoding of the redb backend's records: a current value (with its revisions)
//! and a log entry (one event, with the value it replaced).
//!
//! Hand-written, length-prefixed and versioned so that the format is ours and not a serde
//! library's; every decode checks lengths and tags and reports corruption as
//! [`StoreError::Backend`] naming the key or log position, never panicking.
//!
//! Value record: `version u8 | create_revision u64 | mod_revision u64 | len u32 | value`.
//! Log record:   `version u8 | kind u8 | key_len u32 | key | create_revision u64 |
//!                value_len u32 | value | has_prev u8 [| prev_create u64 | prev_mod u64 |
//!                prev_len u32 | prev_value]`.
//! All integers little-endian. A log record's own `mod_revision` is its log key's revision.

use bytes::Bytes;

use crate::{Event, EventKind, KeyValue, Revision, StoreError};

const VERSION: u8 = 1;
const KIND_PUT: u8 = 1;
const KIND_DELETE: u8 = 2;

/// Encodes the current value of a key.
#[cfg(test)]
fn encode_value(create_revision: Revision, mod_revision: Revision, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_value_into(&mut out, create_revision, mod_revision, value);
    out
}

/// Encodes the current value of a key into `out`, replacing what it held (the writer reuses
/// one buffer for every record of a batch).
pub(super) fn encode_value_into(
    out: &mut Vec<u8>,
    create_revision: Revision,
    mod_revision: Revision,
    value: &[u8],
) {
    out.clear();
    out.reserve(1 + 8 + 8 + 4 + value.len());
    out.push(VERSION);
    out.extend_from_slice(&create_revision.to_le_bytes());
    out.extend_from_slice(&mod_revision.to_le_bytes());
    put_bytes(out, value);
}

/// Decodes the current value of `key`.
pub(super) fn decode_value(key: &str, bytes: &[u8]) -> Result<KeyValue, StoreError> {
    let corrupt =
        |what: &str| StoreError::Backend(format!("corrupt value record of key {key}: {what}"));
    let mut r = Reader::new(bytes);
    let version = r.u8().ok_or_else(|| corrupt("empty record"))?;
    if version != VERSION {
        return Err(corrupt(&format!("unknown format version {version}")));
    }
    let create_revision = r
        .u64()
        .ok_or_else(|| corrupt("truncated create revision"))?;
    let mod_revision = r.u64().ok_or_else(|| corrupt("truncated mod revision"))?;
    let value = r.bytes().ok_or_else(|| corrupt("truncated value"))?;
    if !r.is_empty() {
        return Err(corrupt("trailing bytes"));
    }
    if create_revision == 0 || create_revision > mod_revision {
        return Err(corrupt(&format!(
            "create revision {create_revision} does not precede mod revision {mod_revision}"
        )));
    }
    Ok(KeyValue {
        key: key.to_owned(),
        value: Bytes::copy_from_slice(value),
        create_revision,
        mod_revision,
    })
}

/// Encodes one event of the log; its revision is the log key, not part of the record.
#[cfg(test)]
fn encode_event(event: &Event) -> Vec<u8> {
    let mut out = Vec::new();
    encode_event_into(&mut out, event);
    out
}

/// Encodes one event of the log into `out`, replacing what it held.
pub(super) fn encode_event_into(out: &mut Vec<u8>, event: &Event) {
    let prev_len = event.prev.as_ref().map_or(0, |p| 8 + 8 + 4 + p.value.len());
    out.clear();
    out.reserve(2 + 4 + event.kv.key.len() + 8 + 4 + event.kv.value.len() + 1 + prev_len);
    out.push(VERSION);
    out.push(match event.kind {
        EventKind::Put => KIND_PUT,
        EventKind::Delete => KIND_DELETE,
    });
    put_bytes(out, event.kv.key.as_bytes());
    out.extend_from_slice(&event.kv.create_revision.to_le_bytes());
    put_bytes(out, &event.kv.value);
    match &event.prev {
        None => out.push(0),
        Some(prev) => {
            out.push(1);
            out.extend_from_slice(&prev.create_revision.to_le_bytes());
            out.extend_from_slice(&prev.mod_revision.to_le_bytes());
            put_bytes(out, &prev.value);
        }
    }
}

/// Decodes the log entry at `(revision, seq)`.
pub(super) fn decode_event(
    revision: Revision,
    seq: u32,
    bytes: &[u8],
) -> Result<Event, StoreError> {
    let corrupt = |what: &str| {
        StoreError::Backend(format!(
            "corrupt log entry {seq} of revision {revision}: {what}"
        ))
    };
    let mut r = Reader::new(bytes);
    let version = r.u8().ok_or_else(|| corrupt("empty record"))?;
    if version != VERSION {
        return Err(corrupt(&format!("unknown format version {version}")));
    }
    let kind = match r.u8().ok_or_else(|| corrupt("truncated kind"))? {
        KIND_PUT => EventKind::Put,
        KIND_DELETE => EventKind::Delete,
        other => return Err(corrupt(&format!("unknown event kind {other}"))),
    };
    let key = r.bytes().ok_or_else(|| corrupt("truncated key"))?;
    let key = std::str::from_utf8(key).map_err(|_| corrupt("key is not utf-8"))?;
    // From here on the key is known: name it, it is what an operator greps for.
    let corrupt = |what: &str| {
        StoreError::Backend(format!(
            "corrupt log entry {seq} of revision {revision} (key {key}): {what}"
        ))
    };
    let create_revision = r
        .u64()
        .ok_or_else(|| corrupt("truncated create revision"))?;
    let value = r.bytes().ok_or_else(|| corrupt("truncated value"))?;
    let prev = match r.u8().ok_or_else(|| corrupt("truncated prev flag"))? {
        0 => None,
        1 => {
            let create = r
                .u64()
                .ok_or_else(|| corrupt("truncated prev create revision"))?;
            let modified = r
                .u64()
                .ok_or_else(|| corrupt("truncated prev mod revision"))?;
            let value = r.bytes().ok_or_else(|| corrupt("truncated prev value"))?;
            if modified >= revision || create > modified {
                return Err(corrupt(&format!(
                    "prev revisions {create}/{modified} out of order"
                )));
            }
            Some(KeyValue {
                key: key.to_owned(),
                value: Bytes::copy_from_slice(value),
                create_revision: create,
                mod_revision: modified,
            })
        }
        other => return Err(corrupt(&format!("unknown prev flag {other}"))),
    };
    if !r.is_empty() {
        return Err(corrupt("trailing bytes"));
    }
    if create_revision > revision {
        return Err(corrupt(&format!(
            "create revision {create_revision} is in the future"
        )));
    }
    Ok(Event {
        kind,
        kv: KeyValue {
            key: key.to_owned(),
            value: Bytes::copy_from_slice(value),
            create_revision,
            mod_revision: revision,
        },
        prev,
    })
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    // Keys and values are bounded by the store's limits (well under 4 GiB), checked before
    // any write reaches the encoder.
    let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(bytes);
}

/// A cursor over a record that answers `None` rather than reading past the end.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { rest: bytes }
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.rest.len() < n {
            return None;
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u32(&mut self) -> Option<u32> {
        self.take(4)?.try_into().ok().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Option<u64> {
        self.take(8)?.try_into().ok().map(u64::from_le_bytes)
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = usize::try_from(self.u32()?).ok()?;
        self.take(len)
    }

    fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, value: &str, create: Revision, modified: Revision) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: Bytes::copy_from_slice(value.as_bytes()),
            create_revision: create,
            mod_revision: modified,
        }
    }

    #[test]
    fn value_round_trips() {
        let bytes = encode_value(3, 7, b"hello");
        assert_eq!(decode_value("/k", &bytes).unwrap(), kv("/k", "hello", 3, 7));
        let empty = encode_value(1, 1, b"");
        assert_eq!(decode_value("/e", &empty).unwrap(), kv("/e", "", 1, 1));
    }

    #[test]
    fn event_round_trips_with_and_without_prev() {
        let put = Event {
            kind: EventKind::Put,
            kv: kv("/a/b", "v2", 4, 9),
            prev: Some(kv("/a/b", "v1", 4, 6)),
        };
        assert_eq!(decode_event(9, 0, &encode_event(&put)).unwrap(), put);
        let created = Event {
            kind: EventKind::Put,
            kv: kv("/n", "x", 9, 9),
            prev: None,
        };
        assert_eq!(
            decode_event(9, 1, &encode_event(&created)).unwrap(),
            created
        );
        let delete = Event {
            kind: EventKind::Delete,
            kv: kv("/d", "", 0, 10),
            prev: Some(kv("/d", "old", 2, 5)),
        };
        assert_eq!(decode_event(10, 3, &encode_event(&delete)).unwrap(), delete);
    }

    #[test]
    fn every_truncation_of_a_value_is_an_error_naming_the_key() {
        let bytes = encode_value(3, 7, b"hello");
        for len in 0..bytes.len() {
            let err = decode_value("/trunc", &bytes[..len]).unwrap_err();
            assert!(
                matches!(&err, StoreError::Backend(m) if m.contains("/trunc")),
                "{len}: {err}"
            );
        }
    }

    #[test]
    fn every_truncation_of_an_event_is_an_error() {
        let event = Event {
            kind: EventKind::Put,
            kv: kv("/a", "v2", 1, 5),
            prev: Some(kv("/a", "v1", 1, 1)),
        };
        let bytes = encode_event(&event);
        for len in 0..bytes.len() {
            let err = decode_event(5, 0, &bytes[..len]).unwrap_err();
            assert!(
                matches!(&err, StoreError::Backend(m) if m.contains("revision 5")),
                "{len}: {err}"
            );
        }
    }

    #[test]
    fn trailing_bytes_bad_tags_and_bad_revisions_are_errors() {
        let mut bytes = encode_value(1, 2, b"v");
        bytes.push(0);
        assert!(decode_value("/k", &bytes).is_err());

        let mut bytes = encode_value(1, 2, b"v");
        bytes[0] = 9;
        assert!(decode_value("/k", &bytes).is_err());

        // Created after it was last modified.
        assert!(decode_value("/k", &encode_value(5, 2, b"v")).is_err());
        assert!(decode_value("/k", &encode_value(0, 2, b"v")).is_err());

        let event = Event {
            kind: EventKind::Put,
            kv: kv("/a", "v", 5, 5),
            prev: None,
        };
        let mut bytes = encode_event(&event);
        bytes[1] = 7;
        assert!(decode_event(5, 0, &bytes).is_err());
        // A create revision after the event's own revision.
        assert!(decode_event(4, 0, &encode_event(&event)).is_err());
        // A prev value not older than the event.
        let event = Event {
            kind: EventKind::Put,
            kv: kv("/a", "v", 1, 5),
            prev: Some(kv("/a", "p", 1, 5)),
        };
        assert!(decode_event(5, 0, &encode_event(&event)).is_err());
    }

    #[test]
    fn a_huge_length_prefix_is_an_error_not_an_allocation() {
        let mut bytes = vec![VERSION];
        bytes.extend_from_slice(&1u64.to_le_bytes());
        bytes.extend_from_slice(&1u64.to_le_bytes());
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        bytes.extend_from_slice(b"short");
        assert!(decode_value("/huge", &bytes).is_err());
    }

    #[test]
    fn non_utf8_key_in_log_is_an_error() {
        let mut bytes = vec![VERSION, KIND_PUT];
        bytes.extend_from_slice(&2u32.to_le_bytes());
        bytes.extend_from_slice(&[0xff, 0xfe]);
        assert!(decode_event(1, 0, &bytes).is_err());
    }
}
