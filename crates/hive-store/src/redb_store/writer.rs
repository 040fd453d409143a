//! The single writer thread: group commit of transactions and chunked compaction.
//!
//! redb allows one write transaction at a time and each durable commit costs an fsync, so one
//! thread takes every request pending (up to `max_batch`), applies them in arrival order in
//! one redb write transaction (each successful txn at its own consecutive revision, later ones
//! seeing earlier ones), takes in those that arrived meanwhile the same way, commits once,
//! publishes the events to the hub and only then answers the callers. It must never block on
//! a watcher, nor wait for requests that have not come.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, TryRecvError};

use bytes::Bytes;
use redb::{Durability, ReadableTable, Table, WriteTransaction};
use tokio::sync::oneshot;

use super::hub::RevisionEvents;
use super::{COMPACTED, KV, LOG, META, REVISION, Shared, backend, codec};
use crate::{ConflictKind, Event, EventKind, KeyValue, Op, Revision, StoreError, TxnResponse};

/// How long the writer waits before trimming again after a failed commit.
const TRIM_RETRY: std::time::Duration = std::time::Duration::from_millis(100);

struct CloseHubOnExit(Arc<super::hub::Hub>);

impl Drop for CloseHubOnExit {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// A request to the writer. Callers validate ops before sending.
#[derive(Debug)]
pub(super) enum Request {
    Txn {
        ops: Vec<Op>,
        reply: oneshot::Sender<Result<TxnResponse, StoreError>>,
    },
    Compact {
        revision: Revision,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
}

/// What the writer knows about the committed state; it is the only one changing it.
#[derive(Clone, Copy, Debug)]
pub(super) struct WriterState {
    pub(super) revision: Revision,
    pub(super) compacted: Revision,
    /// Log entries at or before `compacted` may remain (a compaction in progress, or one
    /// interrupted by a crash) and are deleted a chunk per write transaction.
    pub(super) trim_pending: bool,
}

pub(super) struct Writer {
    shared: Arc<Shared>,
    requests: Receiver<Request>,
    state: WriterState,
    /// Compactions answered once the log holds nothing at or before the compacted revision.
    compact_waiters: Vec<oneshot::Sender<Result<(), StoreError>>>,
}

/// A request inside a batch, with its outcome once the batch has been applied.
enum Work {
    Txn {
        ops: Vec<Op>,
        reply: oneshot::Sender<Result<TxnResponse, StoreError>>,
        outcome: Option<Result<TxnResponse, StoreError>>,
    },
    Compact {
        revision: Revision,
        reply: oneshot::Sender<Result<(), StoreError>>,
        /// `None` once applied: recorded, and the caller waits for the trimming to finish.
        outcome: Option<Result<(), StoreError>>,
    },
}

impl From<Request> for Work {
    fn from(request: Request) -> Self {
        match request {
            Request::Txn { ops, reply } => Work::Txn {
                ops,
                reply,
                outcome: None,
            },
            Request::Compact { revision, reply } => Work::Compact {
                revision,
                reply,
                outcome: None,
            },
        }
    }
}

struct Committed {
    state: WriterState,
    published: Vec<Arc<RevisionEvents>>,
}

impl Writer {
    pub(super) fn new(
        shared: Arc<Shared>,
        requests: Receiver<Request>,
        state: WriterState,
    ) -> Self {
        Self {
            shared,
            requests,
            state,
            compact_waiters: Vec::new(),
        }
    }

    /// Serves requests until every sender is gone, then ends the live watch streams.
    pub(super) fn run(mut self) {
        // Watch streams must learn that no more events will come even if this thread dies.
        let _close_hub = CloseHubOnExit(Arc::clone(&self.shared.hub));
        let max_batch = self.shared.options.max_batch.max(1);
        loop {
            let first = if self.state.trim_pending {
                // Keep trimming between batches, but never make a writer wait for it.
                match self.requests.try_recv() {
                    Ok(request) => Some(request),
                    Err(TryRecvError::Empty) => None,
                    Err(TryRecvError::Disconnected) => break,
                }
            } else {
                match self.requests.recv() {
                    Ok(request) => Some(request),
                    Err(_) => break,
                }
            };
            let mut batch: Vec<Request> = first.into_iter().collect();
            while batch.len() < max_batch {
                match self.requests.try_recv() {
                    Ok(request) => batch.push(request),
                    Err(_) => break,
                }
            }
            self.process(batch);
        }
        // An unfinished trim resumes at the next open; the compacted revision is durable.
        for waiter in self.compact_waiters.drain(..) {
            let _ = waiter.send(Err(StoreError::Unavailable(
                "store closed before compaction finished".into(),
            )));
        }
    }

    fn process(&mut self, batch: Vec<Request>) {
        let mut works: Vec<Work> = batch.into_iter().map(Work::from).collect();
        match self.commit(&mut works) {
            Ok(committed) => {
                let trimmed = !committed.state.trim_pending;
                let last = committed.state.revision;
                self.state = committed.state;
                // Watchers first: a caller that sees Ok and then watches finds its write
                // either in the log or on the hub.
                self.shared.hub.publish(&committed.published, last);
                for work in works {
                    match work {
                        Work::Txn { reply, outcome, .. } => {
                            let outcome = outcome.unwrap_or_else(|| {
                                Err(StoreError::Backend("transaction was not applied".into()))
                            });
                            let _ = reply.send(outcome);
                        }
                        Work::Compact {
                            reply,
                            outcome: Some(outcome),
                            ..
                        } => {
                            let _ = reply.send(outcome);
                        }
                        Work::Compact {
                            reply,
                            outcome: None,
                            ..
                        } => {
                            self.compact_waiters.push(reply);
                        }
                    }
                }
                if trimmed {
                    for waiter in self.compact_waiters.drain(..) {
                        let _ = waiter.send(Ok(()));
                    }
                }
            }
            Err(err) => {
                tracing::error!(error = %err, "store write batch failed");
                if self.state.trim_pending {
                    // The trimming would retry at once, forever, if the disk keeps failing.
                    std::thread::sleep(TRIM_RETRY);
                }
                let message = err.to_string();
                for work in works {
                    match work {
                        Work::Txn { reply, .. } => {
                            let _ = reply.send(Err(StoreError::Backend(message.clone())));
                        }
                        Work::Compact { reply, .. } => {
                            let _ = reply.send(Err(StoreError::Backend(message.clone())));
                        }
                    }
                }
            }
        }
    }

    /// Applies a batch in one durable redb transaction. An `Err` means nothing of the batch
    /// is committed; conflicts are per-request outcomes, not errors of the batch.
    ///
    /// Requests that arrive while the batch is being applied join it (up to `max_batch`):
    /// they would otherwise wait for this commit's fsync and then pay a commit of their own.
    /// Under a pipeline of concurrent writers (the scheduler's bindings) commits used to
    /// alternate between a lone request, taken as soon as it came, and all those that came
    /// during its fsync. Nothing waits for late requests: a lone writer is committed at once.
    fn commit(&self, works: &mut Vec<Work>) -> Result<Committed, StoreError> {
        let mut wtxn = self
            .shared
            .db
            .begin_write()
            .map_err(backend("begin write transaction"))?;
        wtxn.set_durability(Durability::Immediate)
            .map_err(backend("set durability"))?;
        let first_revision = self.state.revision + 1;
        let mut state = self.state;
        let mut published = Vec::new();
        let mut dirty = false;
        {
            let mut kv = wtxn.open_table(KV).map_err(backend("open table kv"))?;
            let mut log = wtxn.open_table(LOG).map_err(backend("open table log"))?;
            let mut meta = wtxn.open_table(META).map_err(backend("open table meta"))?;
            let max_batch = self.shared.options.max_batch.max(1);
            let mut scratch = Scratch::default();
            let mut next = 0;
            loop {
                if next == works.len() {
                    if works.len() >= max_batch {
                        break;
                    }
                    match self.requests.try_recv() {
                        Ok(request) => works.push(Work::from(request)),
                        Err(_) => break,
                    }
                }
                let work = &mut works[next];
                next += 1;
                match work {
                    Work::Txn { ops, outcome, .. } => match check(&kv, ops)? {
                        Check::Fails(err) => *outcome = Some(Err(err)),
                        Check::Holds(prevs) => {
                            let revision = state.revision + 1;
                            let ops = std::mem::take(ops);
                            let events =
                                apply(&mut kv, &mut log, &mut scratch, revision, ops, prevs)?;
                            if events.is_empty() {
                                // Changed nothing (`Require`s, a `DeletePrefix` of nothing):
                                // no revision, as etcd, so every revision has an event.
                                *outcome = Some(Ok(TxnResponse {
                                    revision: state.revision,
                                }));
                                continue;
                            }
                            state.revision = revision;
                            dirty = true;
                            published.push(Arc::new(RevisionEvents { revision, events }));
                            *outcome = Some(Ok(TxnResponse { revision }));
                        }
                    },
                    Work::Compact {
                        revision: target,
                        outcome,
                        ..
                    } => {
                        let target = *target;
                        if target > state.revision {
                            *outcome = Some(Err(StoreError::Invalid(format!(
                                "cannot compact to revision {target}: the current revision is {}",
                                state.revision
                            ))));
                        } else if target <= state.compacted {
                            *outcome = Some(Ok(()));
                        } else {
                            // Recorded first so that from this commit on nobody reads the
                            // history being deleted, however long the trimming takes.
                            meta.insert(COMPACTED, target)
                                .map_err(backend("write compacted revision"))?;
                            state.compacted = target;
                            state.trim_pending = true;
                            dirty = true;
                        }
                    }
                }
            }
            if state.revision != self.state.revision {
                meta.insert(REVISION, state.revision)
                    .map_err(backend("write current revision"))?;
            }
            if state.trim_pending {
                let chunk = self.shared.options.compact_chunk.max(1);
                let removed = trim_log(&mut log, state.compacted, chunk)?;
                dirty |= removed > 0;
                state.trim_pending = removed == chunk;
            }
        }
        if dirty {
            wtxn.commit().map_err(|e| {
                StoreError::Backend(format!(
                    "commit of revisions {first_revision}..={}: {e}",
                    state.revision
                ))
            })?;
        } else {
            // Only conflicts and no-ops: nothing to make durable, spare the fsync.
            wtxn.abort().map_err(backend("abort write transaction"))?;
        }
        Ok(Committed { state, published })
    }
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

enum Check {
    /// The conditions hold; the current value of each op's key (none for `DeletePrefix`).
    Holds(Vec<Option<KeyValue>>),
    Fails(StoreError),
}

type KvTable<'t> = Table<'t, &'static str, &'static [u8]>;
type LogTable<'t> = Table<'t, (u64, u32), &'static [u8]>;

fn read_current(kv: &KvTable<'_>, key: &str) -> Result<Option<KeyValue>, StoreError> {
    let guard = kv
        .get(key)
        .map_err(|e| StoreError::Backend(format!("read key {key}: {e}")))?;
    guard
        .map(|g| codec::decode_value(key, g.value()))
        .transpose()
}

/// Checks every condition of a txn against the state so far (including earlier txns of the
/// batch). `validate_ops` guarantees its ops name disjoint keys, so they cannot affect each
/// other's conditions.
fn check(kv: &KvTable<'_>, ops: &[Op]) -> Result<Check, StoreError> {
    let mut prevs = Vec::with_capacity(ops.len());
    for op in ops {
        let failed = |kind| {
            Check::Fails(StoreError::Conflict {
                key: op.key().to_owned(),
                kind,
            })
        };
        let prev = match op {
            Op::DeletePrefix { .. } => {
                prevs.push(None);
                continue;
            }
            other => read_current(kv, other.key())?,
        };
        match (op, &prev) {
            (Op::Create { .. }, Some(current)) => {
                return Ok(failed(ConflictKind::Exists {
                    mod_revision: current.mod_revision,
                }));
            }
            (Op::Update { .. } | Op::Delete { .. } | Op::Require { .. }, None) => {
                return Ok(failed(ConflictKind::Missing));
            }
            (
                Op::Update {
                    mod_revision: expected,
                    ..
                },
                Some(current),
            )
            | (
                Op::Delete {
                    mod_revision: Some(expected),
                    ..
                },
                Some(current),
            )
            | (
                Op::Require {
                    mod_revision: expected,
                    ..
                },
                Some(current),
            ) if *expected != current.mod_revision => {
                return Ok(failed(ConflictKind::RevisionMismatch {
                    expected: *expected,
                    actual: current.mod_revision,
                }));
            }
            _ => {}
        }
        prevs.push(prev);
    }
    Ok(Check::Holds(prevs))
}

/// Buffers the records of a batch are encoded into, reused from one record to the next.
#[derive(Default)]
struct Scratch {
    value: Vec<u8>,
    event: Vec<u8>,
}

/// Applies a checked txn at `revision` and appends its events (in key order) to the log.
/// Takes the ops: their keys and values move into the events.
fn apply(
    kv: &mut KvTable<'_>,
    log: &mut LogTable<'_>,
    scratch: &mut Scratch,
    revision: Revision,
    ops: Vec<Op>,
    prevs: Vec<Option<KeyValue>>,
) -> Result<Vec<Event>, StoreError> {
    let mut events = Vec::with_capacity(ops.len());
    for (op, prev) in ops.into_iter().zip(prevs) {
        match op {
            Op::Create { key, value } | Op::Update { key, value, .. } | Op::Put { key, value } => {
                let create_revision = prev.as_ref().map_or(revision, |p| p.create_revision);
                codec::encode_value_into(&mut scratch.value, create_revision, revision, &value);
                kv.insert(key.as_str(), scratch.value.as_slice())
                    .map_err(|e| StoreError::Backend(format!("write key {key}: {e}")))?;
                events.push(Event {
                    kind: EventKind::Put,
                    kv: KeyValue {
                        key,
                        value,
                        create_revision,
                        mod_revision: revision,
                    },
                    prev,
                });
            }
            Op::Delete { key, .. } => {
                kv.remove(key.as_str())
                    .map_err(|e| StoreError::Backend(format!("delete key {key}: {e}")))?;
                events.push(delete_event(key, revision, prev));
            }
            // A condition only: checked above, writes nothing and leaves no event.
            Op::Require { .. } => {}
            Op::DeletePrefix { prefix } => {
                let doomed = scan_prefix(kv, &prefix)?;
                for current in doomed {
                    kv.remove(current.key.as_str()).map_err(|e| {
                        StoreError::Backend(format!("delete key {}: {e}", current.key))
                    })?;
                    events.push(delete_event(current.key.clone(), revision, Some(current)));
                }
            }
        }
    }
    events.sort_by(|a, b| a.kv.key.cmp(&b.kv.key));
    for (seq, event) in events.iter().enumerate() {
        let seq = u32::try_from(seq).map_err(|_| {
            StoreError::Backend(format!(
                "revision {revision} has more than {} events",
                u32::MAX
            ))
        })?;
        codec::encode_event_into(&mut scratch.event, event);
        log.insert((revision, seq), scratch.event.as_slice())
            .map_err(|e| {
                StoreError::Backend(format!("append revision {revision} to the log: {e}"))
            })?;
    }
    Ok(events)
}

/// A delete event as etcd shapes it: the key, the deleting revision, no value.
fn delete_event(key: String, revision: Revision, prev: Option<KeyValue>) -> Event {
    Event {
        kind: EventKind::Delete,
        kv: KeyValue {
            key,
            value: Bytes::new(),
            create_revision: 0,
            mod_revision: revision,
        },
        prev,
    }
}

fn scan_prefix(kv: &KvTable<'_>, prefix: &str) -> Result<Vec<KeyValue>, StoreError> {
    let scan_err =
        |e: redb::StorageError| StoreError::Backend(format!("scan prefix {prefix}: {e}"));
    let mut found = Vec::new();
    for entry in kv.range(prefix..).map_err(scan_err)? {
        let (key, value) = entry.map_err(scan_err)?;
        let key = key.value();
        if !key.starts_with(prefix) {
            break;
        }
        found.push(codec::decode_value(key, value.value())?);
    }
    Ok(found)
}

/// Deletes up to `chunk` log entries at or before `compacted`; returns how many it deleted.
fn trim_log(
    log: &mut LogTable<'_>,
    compacted: Revision,
    chunk: usize,
) -> Result<usize, StoreError> {
    let trim_err = |e: redb::StorageError| {
        StoreError::Backend(format!("compact the log to revision {compacted}: {e}"))
    };
    let mut removed = 0;
    let mut doomed = log
        .extract_from_if(..=(compacted, u32::MAX), |_, _| true)
        .map_err(trim_err)?;
    while removed < chunk {
        match doomed.next() {
            Some(entry) => {
                entry.map_err(trim_err)?;
                removed += 1;
            }
            None => break,
        }
    }
    doomed.close().map_err(trim_err)?;
    Ok(removed)
}

/// The writer's starting state, read from a freshly opened database.
pub(super) fn initial_state(wtxn: &WriteTransaction) -> Result<WriterState, StoreError> {
    let meta = wtxn.open_table(META).map_err(backend("open table meta"))?;
    let revision = meta_value(&meta, REVISION)?;
    let compacted = meta_value(&meta, COMPACTED)?;
    if compacted > revision {
        return Err(StoreError::Backend(format!(
            "corrupt meta: compacted revision {compacted} is after current revision {revision}"
        )));
    }
    let log = wtxn.open_table(LOG).map_err(backend("open table log"))?;
    let first = log.first().map_err(backend("read the log"))?;
    let trim_pending = first.is_some_and(|(key, _)| key.value().0 <= compacted);
    Ok(WriterState {
        revision,
        compacted,
        trim_pending,
    })
}

fn meta_value(meta: &Table<'_, &'static str, u64>, name: &str) -> Result<Revision, StoreError> {
    Ok(meta
        .get(name)
        .map_err(|e| StoreError::Backend(format!("read meta {name}: {e}")))?
        .map_or(0, |g| g.value()))
}
