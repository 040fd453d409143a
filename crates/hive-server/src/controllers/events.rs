//! Events written by controllers into tenants: how they are made, and the de-duplication
//! that keeps a loop retrying the same decision from writing the same Event again and again.
//! Writing is best effort: an Event that cannot be written is logged, never a reason to stop.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU16, Ordering};

use chrono::Utc;
use hive_api::{Event, EventType, ObjectRef};
use hive_client::Client;

/// Distinguishes Events named in the same millisecond by this process.
static SEQUENCE: AtomicU16 = AtomicU16::new(0);

/// An Event about object `kind`/`name`, named so that names sort by time (the millisecond,
/// then a per-process sequence number, then a random part for other processes).
pub fn new_event(
    type_: EventType,
    source: &str,
    reason: &str,
    kind: &str,
    name: &str,
    message: String,
) -> Event {
    let millis = Utc::now().timestamp_millis().max(0) as u64;
    let seq = SEQUENCE.fetch_add(1, Ordering::Relaxed);
    Event {
        name: format!(
            "{:016x}-{:04x}",
            (millis << 16) | u64::from(seq),
            rand::random::<u16>()
        ),
        type_,
        reason: reason.to_owned(),
        object: ObjectRef {
            kind: kind.to_owned(),
            name: name.to_owned(),
        },
        message: message.chars().take(4000).collect(),
        source: source.to_owned(),
        ..Default::default()
    }
}

/// Writes `ev` into `tenant`, logging a failure.
pub async fn create(client: &Client, tenant: &str, ev: &Event) {
    if let Err(e) = client.create(Some(tenant), ev).await {
        tracing::warn!(%tenant, reason = %ev.reason, error = %e, "record event");
    }
}

/// The last message reported for each key: a decision is reported once per distinct message,
/// however often it is made again.
#[derive(Debug)]
pub struct Dedup<K> {
    last: HashMap<K, String>,
}

impl<K> Default for Dedup<K> {
    fn default() -> Self {
        Self {
            last: HashMap::new(),
        }
    }
}

impl<K: std::hash::Hash + Eq> Dedup<K> {
    /// Whether `message` about `key` is news (and remembers it if so).
    pub fn first(&mut self, key: K, message: &str) -> bool {
        match self.last.get_mut(&key) {
            Some(m) if m == message => false,
            Some(m) => {
                message.clone_into(m);
                true
            }
            None => {
                self.last.insert(key, message.to_owned());
                true
            }
        }
    }

    /// Forgets `key` (its object was placed or deleted): a later decision is news again.
    pub fn forget(&mut self, key: &K) {
        self.last.remove(key);
    }

    pub fn len(&self) -> usize {
        self.last.len()
    }

    pub fn is_empty(&self) -> bool {
        self.last.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_decision_is_reported_once_per_distinct_message() {
        let mut d = Dedup::default();
        let msg = "0/2 nodes available: 2 bound to another tenant";
        assert!(d.first("web-1", msg));
        // Retried every 2 s with the same outcome: nothing new.
        for _ in 0..100 {
            assert!(!d.first("web-1", msg));
        }
        // Another instance, or the same one with another outcome: news.
        assert!(d.first("web-2", msg));
        assert!(d.first("web-1", "0/3 nodes available: 3 insufficient memory"));
        assert!(d.first("web-1", msg));
        // Once placed and forgotten, a new wait is reported again.
        d.forget(&"web-1");
        assert!(d.first("web-1", msg));
        assert_eq!(d.len(), 2);
    }

    #[test]
    fn event_names_are_distinct_and_valid_within_one_millisecond() {
        let names: std::collections::HashSet<String> = (0..1000)
            .map(|_| new_event(EventType::Normal, "s", "R", "instance", "x", String::new()).name)
            .collect();
        assert_eq!(names.len(), 1000);
        for n in names.iter().take(5) {
            hive_api::validate::name("name", n).unwrap();
        }
    }
}
