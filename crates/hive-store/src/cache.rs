//! The watch cache: a [`Store`] that answers reads and watches from memory, fed by one watch
//! on the store behind it.
//!
//! Every API server keeps one. At start it lists the whole keyspace (in pages) and watches
//! every key from the first page's revision, so it holds the store's state as of the newest
//! revision it has applied, plus the most recent events (`history`) for watches to start from.
//! Writes, compaction and the few reads that must not be cached go to the store behind it.
//!
//! **Consistency.** A read waits until the cache has applied at least:
//! - every revision a write through this cache committed, and the revision a failed write
//!   proved the store has reached (so a read after a write, or a retry after a conflict, sees
//!   it);
//! - the revision the caller names ([`WatchCache::wait_for`]; the API takes it from the
//!   request), so a client that read or wrote through another server sees that too.
//!
//! **Bounded staleness.** Every `probe_interval` the cache reads the store's current revision
//! and times how long it takes to apply it. A read is answered only while the cache is known
//! to have matched the store less than `max_staleness` ago; otherwise (the store is
//! unreachable, or the watch is stuck) it fails with [`StoreError::Unavailable`]: never an
//! answer staler than that bound.
//!
//! **Watches** from a revision still in `history` are served from it (many watchers cost the
//! store one watch); older ones, and watchers that fall behind `history`, get a watch on the
//! store instead, which relists them if the store compacted what they need. A synced watch
//! marks the end of its replay at the revision the cache had applied when it opened.
//!
//! It relies on two properties every backend has (the conformance suite checks both): a
//! revision exists only if it changed something (so a watch on everything sees every
//! revision), and the events of one revision are delivered together.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::{
    Event, EventKind, GetResponse, KeyValue, ListResponse, Op, Result, Revision, Store, StoreError,
    SyncedWatchStream, TxnResponse, WatchItem, WatchStream,
};

/// Keys per page of the initial listing.
const LOAD_PAGE: usize = 1000;
/// Events a watcher takes from `history` per lock (whole revisions, so it may take a few more).
const WATCH_PAGE: usize = 256;

/// How a [`WatchCache`] keeps up. Defaults suit an API server.
#[derive(Clone, Debug)]
pub struct WatchCacheOptions {
    /// Reads fail with `Unavailable` once the cache last matched the store longer ago than
    /// this; also how long a read waits for a revision it needs.
    pub max_staleness: Duration,
    /// How often the cache checks that it keeps up with the store (one revision read each).
    pub probe_interval: Duration,
    /// Events kept for watches to start from.
    pub history: usize,
}

impl Default for WatchCacheOptions {
    fn default() -> Self {
        Self {
            max_staleness: Duration::from_secs(5),
            probe_interval: Duration::from_millis(500),
            history: 20_000,
        }
    }
}

/// What the cache holds: the state at `revision` and the events after `history_from`.
#[derive(Debug, Default)]
struct Data {
    kvs: BTreeMap<String, KeyValue>,
    /// Every event with a revision above `history_from`, in order.
    history: VecDeque<Event>,
    history_from: Revision,
    /// The newest revision applied: `kvs` is the store's state at it.
    revision: Revision,
}

impl Data {
    /// Applies events (whole revisions, in order) and keeps at most `cap` of them.
    ///
    /// An event older than what is held for its key changes nothing: right after a paged
    /// listing, a page may already show what an event replays.
    fn apply(&mut self, events: Vec<Event>, cap: usize) {
        for ev in events {
            let revision = ev.revision();
            let key = &ev.kv.key;
            let held = self.kvs.get(key).map(|kv| kv.mod_revision);
            match ev.kind {
                EventKind::Put if held.is_none_or(|r| r < revision) => {
                    self.kvs.insert(key.clone(), ev.kv.clone());
                }
                EventKind::Delete if held.is_some_and(|r| r < revision) => {
                    self.kvs.remove(key);
                }
                _ => {}
            }
            self.revision = self.revision.max(revision);
            self.history.push_back(ev);
        }
        while self.history.len() > cap {
            if let Some(dropped) = self.history.pop_front() {
                // Events of this revision may remain, but a watch after it needs none of them.
                self.history_from = self.history_from.max(dropped.revision());
            }
        }
    }

    /// Drops the history at and before `revision`.
    fn compact(&mut self, revision: Revision) {
        let keep = self.history.partition_point(|e| e.revision() <= revision);
        self.history.drain(..keep);
        self.history_from = self.history_from.max(revision);
    }
}

struct Shared {
    data: RwLock<Data>,
    /// The revision `data` is at, for readers and watchers to wait on.
    applied: watch::Sender<Revision>,
    /// The newest revision known committed through this cache: reads wait for it.
    floor: AtomicU64,
    /// The store's compacted revision as far as this cache knows.
    compacted: AtomicU64,
    /// When a probe last found the cache caught up (the probe's start).
    fresh: Mutex<Instant>,
    closed: AtomicBool,
    /// A read of the store's revision after a write of unknown outcome is under way.
    learning: AtomicBool,
    options: WatchCacheOptions,
}

impl Shared {
    fn read(&self) -> RwLockReadGuard<'_, Data> {
        self.data.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, Data> {
        self.data.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn raise_floor(&self, revision: Revision) {
        self.floor.fetch_max(revision, Ordering::AcqRel);
    }

    fn publish(&self, revision: Revision) {
        self.applied.send_if_modified(|r| {
            let newer = revision > *r;
            *r = (*r).max(revision);
            newer
        });
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        // Wakes every watcher so that it sees the closing.
        self.applied.send_modify(|_| {});
    }
}

/// A [`Store`] answering reads and watches from memory; see the module's documentation.
pub struct WatchCache {
    inner: Arc<dyn Store>,
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for WatchCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchCache")
            .field("revision", &*self.shared.applied.borrow())
            .finish_non_exhaustive()
    }
}

impl Drop for WatchCache {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        self.shared.close();
    }
}

impl WatchCache {
    /// Loads the whole store into memory and starts following it.
    pub async fn start(inner: Arc<dyn Store>, options: WatchCacheOptions) -> Result<Self> {
        let began = Instant::now();
        let (data, stream) = load(&*inner, options.history).await?;
        let compacted = inner.compacted_revision().await?;
        let revision = data.revision;
        let shared = Arc::new(Shared {
            data: RwLock::new(data),
            applied: watch::Sender::new(revision),
            floor: AtomicU64::new(revision),
            compacted: AtomicU64::new(compacted),
            fresh: Mutex::new(began),
            closed: AtomicBool::new(false),
            learning: AtomicBool::new(false),
            options,
        });
        let tasks = vec![
            tokio::spawn(feed(inner.clone(), shared.clone(), stream)),
            tokio::spawn(probe(inner.clone(), shared.clone())),
        ];
        Ok(Self {
            inner,
            shared,
            tasks,
        })
    }

    /// The newest revision applied.
    pub fn revision(&self) -> Revision {
        *self.shared.applied.borrow()
    }

    /// The newest revision a read would wait for: a committed revision at least as new as
    /// anything this cache has answered.
    pub fn known_revision(&self) -> Revision {
        self.revision()
            .max(self.shared.floor.load(Ordering::Acquire))
    }

    /// Waits until the cache has applied `revision` (and everything committed through it), or
    /// fails with `Unavailable` when it does not get there within `max_staleness` or is staler
    /// than that. A revision the store has not reached (a caller that saw another history, such
    /// as the store before a migration) asks for no more than the store's current one.
    pub async fn wait_for(&self, revision: Revision) -> Result<()> {
        let mut revision = revision;
        if revision > self.known_revision() {
            // Beyond anything this server has seen: is it a revision at all?
            revision = revision.min(self.inner.current_revision().await?);
        }
        let need = revision.max(self.shared.floor.load(Ordering::Acquire));
        let max = self.shared.options.max_staleness;
        let mut rx = self.shared.applied.subscribe();
        if tokio::time::timeout(max, rx.wait_for(|r| *r >= need))
            .await
            .is_err()
        {
            return Err(StoreError::Unavailable(format!(
                "the watch cache has not reached revision {need} in {max:?} (it is at {})",
                self.revision()
            )));
        }
        let age = self
            .shared
            .fresh
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .elapsed();
        if age > max {
            return Err(StoreError::Unavailable(format!(
                "the watch cache last matched the store {:.1} s ago, more than the {max:?} \
                 allowed",
                age.as_secs_f64()
            )));
        }
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(StoreError::Unavailable("store closed".into()));
        }
        Ok(())
    }

    /// After a conflict: the store is at least where the failure shows, so reads wait for
    /// that (a retry must not read the state the write failed on again).
    async fn learn_from_conflict(&self) {
        learn_revision(self.inner.as_ref(), &self.shared).await;
    }

    /// After a write of unknown outcome (the store did not answer): the same, off the
    /// request's path — while the store is away that read waits out its own timeout, and the
    /// `Unavailable` answer should not. One such read at a time.
    fn learn_in_background(&self) {
        if self.shared.learning.swap(true, Ordering::AcqRel) {
            return;
        }
        let (inner, shared) = (self.inner.clone(), self.shared.clone());
        tokio::spawn(async move {
            learn_revision(inner.as_ref(), &shared).await;
            shared.learning.store(false, Ordering::Release);
        });
    }
}

/// Raises the read floor to the store's current revision, when the store answers.
async fn learn_revision(store: &dyn Store, shared: &Shared) {
    if let Ok(current) = store.current_revision().await {
        shared.raise_floor(current);
    }
}

#[async_trait::async_trait]
impl Store for WatchCache {
    async fn get(&self, key: &str) -> Result<GetResponse> {
        self.wait_for(0).await?;
        let data = self.shared.read();
        Ok(GetResponse {
            kv: data.kvs.get(key).cloned(),
            revision: data.revision,
        })
    }

    async fn get_uncached(&self, key: &str) -> Result<GetResponse> {
        let got = self.inner.get(key).await?;
        self.shared.raise_floor(got.revision);
        Ok(got)
    }

    async fn list(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<ListResponse> {
        self.wait_for(0).await?;
        let data = self.shared.read();
        let from = match start_after {
            Some(after) if after >= prefix => Bound::Excluded(after),
            _ => Bound::Included(prefix),
        };
        let limit = if limit == 0 { usize::MAX } else { limit };
        let mut matching = data
            .kvs
            .range::<str, _>((from, Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, kv)| kv);
        let kvs: Vec<KeyValue> = matching.by_ref().take(limit).cloned().collect();
        let more = matching.next().is_some();
        Ok(ListResponse {
            kvs,
            revision: data.revision,
            more,
        })
    }

    async fn txn(&self, ops: Vec<Op>) -> Result<TxnResponse> {
        match self.inner.txn(ops).await {
            Ok(resp) => {
                self.shared.raise_floor(resp.revision);
                Ok(resp)
            }
            Err(e @ StoreError::Conflict { .. }) => {
                self.learn_from_conflict().await;
                Err(e)
            }
            Err(e @ StoreError::Unavailable(_)) => {
                self.learn_in_background();
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream> {
        let Some(watch) = self.cache_watch(prefix, after, false)? else {
            return self.inner.watch(prefix, after).await;
        };
        Ok(Box::pin(watch.items().filter_map(|item| {
            std::future::ready(match item {
                Ok(WatchItem::Event(event)) => Some(Ok(event)),
                Ok(WatchItem::Synced(_)) => None,
                Err(err) => Some(Err(err)),
            })
        })))
    }

    async fn watch_synced(&self, prefix: &str, after: Revision) -> Result<SyncedWatchStream> {
        // As a read: the mark is at a revision at least as new as every write through here.
        self.wait_for(0).await?;
        match self.cache_watch(prefix, after, true)? {
            Some(watch) => Ok(Box::pin(watch.items())),
            None => self.inner.watch_synced(prefix, after).await,
        }
    }

    async fn current_revision(&self) -> Result<Revision> {
        self.wait_for(0).await?;
        Ok(self.revision())
    }

    async fn compact(&self, revision: Revision) -> Result<()> {
        self.inner.compact(revision).await?;
        let compacted = self.inner.compacted_revision().await?;
        self.shared.compacted.fetch_max(compacted, Ordering::AcqRel);
        self.shared.write().compact(compacted);
        Ok(())
    }

    async fn compacted_revision(&self) -> Result<Revision> {
        let compacted = self.inner.compacted_revision().await?;
        self.shared.compacted.fetch_max(compacted, Ordering::AcqRel);
        Ok(compacted)
    }
}

impl WatchCache {
    /// A watch served from `history`, or None when `after` is older than it (the store
    /// serves that one). With `mark_synced`, it marks the end of its replay at the revision
    /// the cache has applied now: the one this server's reads answer at.
    fn cache_watch(
        &self,
        prefix: &str,
        after: Revision,
        mark_synced: bool,
    ) -> Result<Option<CacheWatch>> {
        let compacted = self.shared.compacted.load(Ordering::Acquire);
        if after < compacted {
            return Err(StoreError::Compacted {
                requested: after,
                compacted,
            });
        }
        let (history_from, applied) = {
            let data = self.shared.read();
            (data.history_from, data.revision)
        };
        if after < history_from {
            return Ok(None);
        }
        Ok(Some(CacheWatch {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
            rx: self.shared.applied.subscribe(),
            prefix: prefix.to_owned(),
            cursor: after,
            buf: VecDeque::new(),
            synced_at: mark_synced.then_some(applied),
            fallback: None,
            done: false,
        }))
    }
}

/// Lists every key (in pages, each its own snapshot) and watches from the first page's
/// revision until every revision up to the last page's is applied: then the state is the
/// store's at one revision.
async fn load(inner: &dyn Store, cap: usize) -> Result<(Data, WatchStream)> {
    let mut kvs = BTreeMap::new();
    let mut after: Option<String> = None;
    let mut first = None;
    let last = loop {
        let page = inner.list("", after.as_deref(), LOAD_PAGE).await?;
        first.get_or_insert(page.revision);
        for kv in page.kvs {
            after = Some(kv.key.clone());
            kvs.insert(kv.key.clone(), kv);
        }
        if !page.more {
            break page.revision;
        }
    };
    let first = first.unwrap_or(last);
    let mut data = Data {
        kvs,
        history: VecDeque::new(),
        history_from: first,
        revision: first,
    };
    let mut stream = inner.watch("", first).await?;
    while data.revision < last {
        let (batch, end) = next_batch(&mut stream).await;
        data.apply(batch, cap);
        if let Some(end) = end {
            return Err(end.unwrap_or_else(|| {
                StoreError::Unavailable("the store's watch ended while loading".into())
            }));
        }
    }
    Ok((data, stream))
}

/// Waits for the next event, then takes every event already there with it (whole revisions).
/// The second value is set when the stream failed (`Some(Some(err))`) or ended (`Some(None)`)
/// after the events returned.
async fn next_batch(stream: &mut WatchStream) -> (Vec<Event>, Option<Option<StoreError>>) {
    let mut batch = Vec::new();
    let mut item = stream.next().await;
    loop {
        match item {
            Some(Ok(ev)) => batch.push(ev),
            Some(Err(e)) => return (batch, Some(Some(e))),
            None => return (batch, Some(None)),
        }
        match stream.next().now_or_never() {
            Some(next) => item = next,
            None => return (batch, None),
        }
    }
}

/// Applies what the store's watch delivers; when it fails, watches again from the revision
/// applied, or reloads everything if the store no longer has the history.
async fn feed(inner: Arc<dyn Store>, shared: Arc<Shared>, mut stream: WatchStream) {
    let cap = shared.options.history;
    let mut backoff = Duration::from_millis(50);
    loop {
        let (batch, end) = next_batch(&mut stream).await;
        if !batch.is_empty() {
            let revision = {
                let mut data = shared.write();
                data.apply(batch, cap);
                data.revision
            };
            shared.publish(revision);
            backoff = Duration::from_millis(50);
        }
        let Some(end) = end else {
            continue;
        };
        let mut compacted = matches!(end, Some(StoreError::Compacted { .. }));
        tracing::warn!(error = ?end, "watch cache: the store's watch ended; resuming");
        loop {
            if !compacted {
                let from = shared.read().revision;
                match inner.watch("", from).await {
                    Ok(s) => {
                        stream = s;
                        break;
                    }
                    Err(StoreError::Compacted { .. }) => compacted = true,
                    Err(e) => tracing::warn!(error = %e, "watch cache: watching the store"),
                }
            }
            if compacted {
                match load(&*inner, cap).await {
                    Ok((data, s)) => {
                        let revision = data.revision;
                        *shared.write() = data;
                        shared.publish(revision);
                        stream = s;
                        tracing::info!(revision, "watch cache: reloaded the store");
                        break;
                    }
                    Err(e) => tracing::warn!(error = %e, "watch cache: reloading the store"),
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }
}

/// Times how far behind the store the cache is: each round reads the store's revision and
/// waits for the cache to apply it; when it does, the cache was current at the round's start.
async fn probe(inner: Arc<dyn Store>, shared: Arc<Shared>) {
    let interval = shared.options.probe_interval;
    let mut rx = shared.applied.subscribe();
    loop {
        let began = Instant::now();
        if let Ok(current) = inner.current_revision().await
            && tokio::time::timeout(shared.options.max_staleness, rx.wait_for(|r| *r >= current))
                .await
                .is_ok()
        {
            *shared.fresh.lock().unwrap_or_else(PoisonError::into_inner) = began;
        }
        tokio::time::sleep_until(began + interval).await;
    }
}

/// A watch served from the cache's history.
struct CacheWatch {
    inner: Arc<dyn Store>,
    shared: Arc<Shared>,
    rx: watch::Receiver<Revision>,
    prefix: String,
    /// Every event at or before this revision has been handed out (or skipped).
    cursor: Revision,
    buf: VecDeque<Event>,
    /// The revision to mark [`WatchItem::Synced`] at once the cursor has reached it; None
    /// when not asked for, or once marked.
    synced_at: Option<Revision>,
    /// A watch on the store, once this one fell behind the history.
    fallback: Option<SyncedWatchStream>,
    done: bool,
}

impl CacheWatch {
    fn items(self) -> impl futures_util::Stream<Item = Result<WatchItem>> + Send + 'static {
        futures_util::stream::unfold(
            self,
            |mut w| async move { w.next().await.map(|item| (item, w)) },
        )
    }

    async fn next(&mut self) -> Option<Result<WatchItem>> {
        loop {
            if self.done {
                return None;
            }
            if let Some(ev) = self.buf.pop_front() {
                return Some(Ok(WatchItem::Event(ev)));
            }
            if let Some(stream) = &mut self.fallback {
                let item = stream.next().await;
                self.done = !matches!(item, Some(Ok(_)));
                // The store's own mark (at its revision, past ours) stands for ours while
                // ours is due.
                if let Some(Ok(WatchItem::Synced(_))) = &item
                    && self.synced_at.take().is_none()
                {
                    continue;
                }
                return item;
            }
            if let Some(at) = self.synced_at
                && self.cursor >= at
            {
                self.synced_at = None;
                return Some(Ok(WatchItem::Synced(at)));
            }
            if self.shared.closed.load(Ordering::Acquire) {
                self.done = true;
                return Some(Err(StoreError::Unavailable("store closed".into())));
            }
            let compacted = self.shared.compacted.load(Ordering::Acquire);
            if self.cursor < compacted {
                self.done = true;
                return Some(Err(StoreError::Compacted {
                    requested: self.cursor,
                    compacted,
                }));
            }
            // Marked before reading, so a revision applied meanwhile wakes the wait below.
            self.rx.borrow_and_update();
            let behind = {
                let data = self.shared.read();
                if self.cursor < data.history_from {
                    true
                } else {
                    let start = data
                        .history
                        .partition_point(|e| e.revision() <= self.cursor);
                    for (taken, ev) in data.history.range(start..).enumerate() {
                        if taken >= WATCH_PAGE && ev.revision() > self.cursor {
                            break;
                        }
                        self.cursor = ev.revision();
                        if ev.kv.key.starts_with(&self.prefix) {
                            self.buf.push_back(ev.clone());
                        }
                    }
                    false
                }
            };
            if behind {
                let opened = match self.synced_at {
                    Some(_) => self.inner.watch_synced(&self.prefix, self.cursor).await,
                    None => self.inner.watch(&self.prefix, self.cursor).await.map(
                        |events| -> SyncedWatchStream {
                            Box::pin(events.map(|e| e.map(WatchItem::Event)))
                        },
                    ),
                };
                match opened {
                    Ok(stream) => self.fallback = Some(stream),
                    Err(e) => {
                        self.done = true;
                        return Some(Err(e));
                    }
                }
                continue;
            }
            if self.buf.is_empty()
                && self.synced_at.is_none_or(|at| self.cursor < at)
                && self.rx.changed().await.is_err()
            {
                self.done = true;
                return Some(Err(StoreError::Unavailable("store closed".into())));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn kv(key: &str, value: &str, create: Revision, modified: Revision) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: Bytes::copy_from_slice(value.as_bytes()),
            create_revision: create,
            mod_revision: modified,
        }
    }

    fn put(key: &str, value: &str, create: Revision, revision: Revision) -> Event {
        Event {
            kind: EventKind::Put,
            kv: kv(key, value, create, revision),
            prev: None,
        }
    }

    fn delete(key: &str, revision: Revision) -> Event {
        Event {
            kind: EventKind::Delete,
            kv: kv(key, "", 0, revision),
            prev: Some(kv(key, "old", 1, revision - 1)),
        }
    }

    #[test]
    fn replayed_events_never_undo_a_newer_page() {
        // Pages listed at revisions 10 and 14; the watch replays 11..=14.
        let mut data = Data {
            kvs: [
                ("/a", kv("/a", "a12", 5, 12)), // page 2 saw a write replayed below
                ("/b", kv("/b", "b3", 3, 3)),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
            history_from: 10,
            revision: 10,
            ..Default::default()
        };
        data.apply(
            vec![
                put("/a", "a11", 5, 11),
                put("/a", "a12", 5, 12),
                delete("/c", 13), // created and deleted before page 2: never listed
                delete("/b", 14),
            ],
            100,
        );
        assert_eq!(data.revision, 14);
        assert_eq!(data.kvs.len(), 1);
        assert_eq!(data.kvs["/a"].value, Bytes::from_static(b"a12"));
        // Recreated after a delete the page already reflects: the put is newer, so it lands.
        data.apply(vec![put("/b", "b15", 15, 15)], 100);
        assert_eq!(data.kvs["/b"].mod_revision, 15);
        assert_eq!(data.history.len(), 5);
    }

    #[test]
    fn history_is_capped_by_whole_revisions() {
        let mut data = Data::default();
        data.apply(
            vec![
                put("/a", "1", 1, 1),
                put("/a", "2", 1, 2),
                put("/b", "2", 2, 2),
                put("/a", "3", 1, 3),
            ],
            2,
        );
        // Revision 2 lost one of its events: a watch must start after it.
        assert_eq!(data.history.len(), 2);
        assert_eq!(data.history_from, 2);
        data.compact(3);
        assert!(data.history.is_empty());
        assert_eq!(data.history_from, 3);
        assert_eq!(data.kvs.len(), 2, "compaction keeps current values");
    }
}
