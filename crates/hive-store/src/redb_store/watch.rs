//! Watch streams of the redb backend: history from the log table, then live events from the
//! hub, and back to the log whenever the hub cut the watcher off for being slow.
//!
//! The stream keeps a cursor `(revision, seq)`: every event at or before it has been handed
//! out (or skipped for its prefix). That is also how a synced watch knows its replay is over:
//! the cursor has passed the revision the store was at when it opened. Log pages and live revisions only ever move it forward, so
//! switching between the two sources can neither skip nor repeat an event.

use std::collections::VecDeque;
use std::ops::Bound;
use std::sync::Arc;

use redb::ReadableDatabase;

use super::hub::{Closed, Registration};
use super::{LOG, Shared, backend, codec};
use futures_util::StreamExt;

use crate::{Event, Revision, StoreError, SyncedWatchStream, WatchItem, WatchStream};

/// Position in the log; `seq == COMPLETE` means the whole revision has been handed out.
type Cursor = (Revision, u32);
const COMPLETE: u32 = u32::MAX;

pub(super) async fn watch(
    shared: Arc<Shared>,
    prefix: String,
    after: Revision,
) -> Result<WatchStream, StoreError> {
    let items = open(shared, prefix, after, false).await?;
    Ok(Box::pin(items.filter_map(|item| {
        std::future::ready(match item {
            Ok(WatchItem::Event(event)) => Some(Ok(event)),
            Ok(WatchItem::Synced(_)) => None,
            Err(err) => Some(Err(err)),
        })
    })))
}

/// [`watch`], marking the end of the replay: the target is the last revision published when
/// the watch opens, which is at least every revision a caller was answered (the writer
/// publishes before it answers) and which the cursor is sure to reach (the log up to a
/// registration's `since`, then the channel).
pub(super) async fn watch_synced(
    shared: Arc<Shared>,
    prefix: String,
    after: Revision,
) -> Result<SyncedWatchStream, StoreError> {
    open(shared, prefix, after, true).await
}

async fn open(
    shared: Arc<Shared>,
    prefix: String,
    after: Revision,
    mark_synced: bool,
) -> Result<SyncedWatchStream, StoreError> {
    let meta = shared.blocking(|s| s.read_meta()).await?;
    if after < meta.compacted {
        return Err(StoreError::Compacted {
            requested: after,
            compacted: meta.compacted,
        });
    }
    let synced_at = match mark_synced {
        true => Some(shared.hub.last_published().map_err(closed)?),
        false => None,
    };
    let state = Watch {
        shared,
        prefix,
        cursor: (after, COMPLETE),
        pending: VecDeque::new(),
        live: None,
        synced_at,
        finished: false,
    };
    Ok(Box::pin(futures_util::stream::unfold(
        state,
        |mut watch| async move {
            let item = watch.next().await?;
            Some((item, watch))
        },
    )))
}

struct Watch {
    shared: Arc<Shared>,
    prefix: String,
    cursor: Cursor,
    /// Events read but not yet handed out: at most one log page or one revision.
    pending: VecDeque<Event>,
    live: Option<Registration>,
    /// The revision to mark [`WatchItem::Synced`] at once the cursor has passed it; None
    /// when not asked for, or once marked.
    synced_at: Option<Revision>,
    finished: bool,
}

fn closed(_: Closed) -> StoreError {
    StoreError::Unavailable("store closed".into())
}

impl Watch {
    async fn next(&mut self) -> Option<Result<WatchItem, StoreError>> {
        loop {
            if self.finished {
                return None;
            }
            if let Some(event) = self.pending.pop_front() {
                return Some(Ok(WatchItem::Event(event)));
            }
            // Nothing pending and the cursor past the target: every event up to it is out.
            if let Some(at) = self.synced_at
                && self.cursor >= (at, COMPLETE)
            {
                self.synced_at = None;
                return Some(Ok(WatchItem::Synced(at)));
            }
            if let Err(err) = self.step().await {
                // The stream's contract: it ends only with an error.
                self.finished = true;
                self.live = None;
                return Some(Err(err));
            }
        }
    }

    /// Moves the cursor forward by one log page or one live revision, or (re)registers.
    async fn step(&mut self) -> Result<(), StoreError> {
        let Some(since) = self.live.as_ref().map(|live| live.since) else {
            let published = self.shared.hub.last_published().map_err(closed)?;
            let page = self.shared.options.watch_page.max(1) as u64;
            if published.saturating_sub(self.cursor.0) > page {
                // Far behind: catch up without a live channel, which would only overflow again.
                return self.read_page(published).await;
            }
            self.live = Some(self.shared.hub.register(&self.prefix).map_err(closed)?);
            return Ok(());
        };
        if self.cursor < (since, COMPLETE) {
            // Everything up to the registration comes from the log, the rest from the channel.
            return self.read_page(since).await;
        }
        let Some(live) = self.live.as_mut() else {
            return Ok(());
        };
        match live.rx.recv().await {
            Some(revision) => {
                // A watch from the future skips what it did not ask for.
                if revision.revision > self.cursor.0 {
                    let prefix = &self.prefix;
                    self.pending.extend(
                        revision
                            .events
                            .iter()
                            .filter(|e| e.kv.key.starts_with(prefix.as_str()))
                            .cloned(),
                    );
                    self.cursor = (revision.revision, COMPLETE);
                }
            }
            // Cut off for being slow (or the store closed): what was buffered has been
            // consumed; the next step catches up from the log or reports the closing.
            None => self.live = None,
        }
        Ok(())
    }

    async fn read_page(&mut self, upto: Revision) -> Result<(), StoreError> {
        let prefix = self.prefix.clone();
        let after = self.cursor;
        let limit = self.shared.options.watch_page.max(1);
        let (events, cursor) = self
            .shared
            .blocking(move |s| read_log(s, &prefix, after, upto, limit))
            .await?;
        self.pending.extend(events);
        self.cursor = cursor;
        Ok(())
    }
}

/// Reads `limit` log entries after `after` and at or before revision `upto` (more to finish
/// the last revision), in one snapshot; returns those under `prefix` and the new cursor.
fn read_log(
    shared: &Shared,
    prefix: &str,
    after: Cursor,
    upto: Revision,
    limit: usize,
) -> Result<(Vec<Event>, Cursor), StoreError> {
    let rtxn = shared
        .db
        .begin_read()
        .map_err(backend("begin read transaction"))?;
    let meta = super::read_meta_in(&rtxn)?;
    if after < (meta.compacted, COMPLETE) {
        return Err(StoreError::Compacted {
            requested: after.0,
            compacted: meta.compacted,
        });
    }
    let upto = upto.min(meta.revision);
    let end: Cursor = (upto, COMPLETE);
    if after >= end {
        return Ok((Vec::new(), after));
    }
    let log = rtxn.open_table(LOG).map_err(backend("open table log"))?;
    let read_err = |e: redb::StorageError| {
        StoreError::Backend(format!("read the log after revision {}: {e}", after.0))
    };
    let mut events = Vec::new();
    let mut last = after.0;
    for (scanned, entry) in log
        .range::<Cursor>((Bound::Excluded(after), Bound::Included(end)))
        .map_err(read_err)?
        .enumerate()
    {
        let (key, value) = entry.map_err(read_err)?;
        let (revision, seq) = key.value();
        // A page ends between revisions: the events of one revision are handed out together.
        if scanned >= limit && revision != last {
            return Ok((events, (last, COMPLETE)));
        }
        let event = codec::decode_event(revision, seq, value.value())?;
        if event.kv.key.starts_with(prefix) {
            events.push(event);
        }
        last = revision;
    }
    Ok((events, end))
}
