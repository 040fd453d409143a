//! The in-memory fan-out of committed events to live watchers.
//!
//! The writer thread publishes each committed batch here; every watcher has a bounded
//! channel. A watcher whose channel is full is cut off (its sender dropped) instead of making
//! the writer wait or the memory grow: its stream notices the closed channel and catches up
//! from the log table. The hub owns no history; the log does.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::mpsc;

use crate::{Event, Revision};

/// The events of one committed revision, shared by every watcher that receives them.
#[derive(Debug)]
pub(super) struct RevisionEvents {
    pub(super) revision: Revision,
    /// In key order, as in the log.
    pub(super) events: Vec<Event>,
}

#[derive(Debug)]
pub(super) struct Hub {
    state: Mutex<HubState>,
    buffer: usize,
}

#[derive(Debug)]
struct HubState {
    last_published: Revision,
    next_id: u64,
    watchers: HashMap<u64, Watcher>,
    closed: bool,
}

#[derive(Debug)]
struct Watcher {
    prefix: String,
    tx: mpsc::Sender<Arc<RevisionEvents>>,
}

/// The store has shut down: no more events will be published.
#[derive(Debug)]
pub(super) struct Closed;

/// A live subscription; dropping it unregisters the watcher.
#[derive(Debug)]
pub(super) struct Registration {
    hub: Arc<Hub>,
    id: u64,
    /// Every revision after `since` that touches the prefix arrives on `rx`, until it closes.
    pub(super) since: Revision,
    pub(super) rx: mpsc::Receiver<Arc<RevisionEvents>>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.hub.lock().watchers.remove(&self.id);
    }
}

impl Hub {
    pub(super) fn new(last_published: Revision, buffer: usize) -> Self {
        Self {
            state: Mutex::new(HubState {
                last_published,
                next_id: 0,
                watchers: HashMap::new(),
                closed: false,
            }),
            buffer: buffer.max(1),
        }
    }

    // A panic while holding the lock cannot leave the state half-updated in a way that
    // matters (at worst a watcher is cut off and catches up), so poisoning is ignored.
    fn lock(&self) -> MutexGuard<'_, HubState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn last_published(&self) -> Result<Revision, Closed> {
        let state = self.lock();
        if state.closed {
            return Err(Closed);
        }
        Ok(state.last_published)
    }

    /// Registers a watcher of `prefix`. The registration's `since` is the last published
    /// revision at this instant, so the log up to `since` plus the channel cover everything.
    pub(super) fn register(self: &Arc<Self>, prefix: &str) -> Result<Registration, Closed> {
        let (tx, rx) = mpsc::channel(self.buffer);
        let mut state = self.lock();
        if state.closed {
            return Err(Closed);
        }
        let id = state.next_id;
        state.next_id += 1;
        state.watchers.insert(
            id,
            Watcher {
                prefix: prefix.to_owned(),
                tx,
            },
        );
        let since = state.last_published;
        drop(state);
        Ok(Registration {
            hub: Arc::clone(self),
            id,
            since,
            rx,
        })
    }

    /// Hands a committed batch to every watcher, never waiting: a watcher without room is
    /// dropped. `last` is the batch's last revision (a revision may have no events).
    pub(super) fn publish(&self, batch: &[Arc<RevisionEvents>], last: Revision) {
        let mut state = self.lock();
        state.watchers.retain(|_, watcher| {
            for revision in batch {
                if !revision
                    .events
                    .iter()
                    .any(|e| e.kv.key.starts_with(&watcher.prefix))
                {
                    continue;
                }
                if watcher.tx.try_send(Arc::clone(revision)).is_err() {
                    // Full (a slow reader: it catches up from the log) or closed (the stream
                    // is gone); either way this sender is done.
                    return false;
                }
            }
            true
        });
        state.last_published = state.last_published.max(last);
    }

    /// Ends every live stream; later registrations fail.
    pub(super) fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        state.watchers.clear();
    }

    #[cfg(test)]
    pub(super) fn watcher_count(&self) -> usize {
        self.lock().watchers.len()
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::{EventKind, KeyValue};

    fn revision(revision: Revision, key: &str) -> Arc<RevisionEvents> {
        Arc::new(RevisionEvents {
            revision,
            events: vec![Event {
                kind: EventKind::Put,
                kv: KeyValue {
                    key: key.into(),
                    value: Bytes::new(),
                    create_revision: revision,
                    mod_revision: revision,
                },
                prev: None,
            }],
        })
    }

    #[test]
    fn a_full_watcher_is_cut_off_without_blocking_and_others_keep_going() {
        let hub = Arc::new(Hub::new(0, 2));
        let mut slow = hub.register("/a/").unwrap();
        let mut other = hub.register("/b/").unwrap();
        assert_eq!(slow.since, 0);
        hub.publish(
            &[
                revision(1, "/a/1"),
                revision(2, "/a/2"),
                revision(3, "/a/3"),
            ],
            3,
        );
        assert_eq!(hub.watcher_count(), 1, "the slow watcher must be dropped");
        // What was buffered before the cut is still delivered, then the channel ends.
        assert_eq!(slow.rx.try_recv().unwrap().revision, 1);
        assert_eq!(slow.rx.try_recv().unwrap().revision, 2);
        assert!(matches!(
            slow.rx.try_recv(),
            Err(mpsc::error::TryRecvError::Disconnected)
        ));
        // The other prefix saw nothing and is still registered.
        assert!(matches!(
            other.rx.try_recv(),
            Err(mpsc::error::TryRecvError::Empty)
        ));
        hub.publish(&[revision(4, "/b/x")], 4);
        assert_eq!(other.rx.try_recv().unwrap().revision, 4);
        assert_eq!(hub.last_published().unwrap(), 4);
    }

    #[test]
    fn dropping_a_registration_unregisters_and_close_ends_everything() {
        let hub = Arc::new(Hub::new(7, 4));
        let first = hub.register("").unwrap();
        assert_eq!(first.since, 7);
        let second = hub.register("").unwrap();
        assert_eq!(hub.watcher_count(), 2);
        drop(first);
        assert_eq!(hub.watcher_count(), 1);
        hub.close();
        assert_eq!(hub.watcher_count(), 0);
        assert!(hub.register("").is_err());
        assert!(hub.last_published().is_err());
        drop(second);
    }
}
