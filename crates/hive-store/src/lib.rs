//! A revisioned key-value store: the one contract every Hive state backend implements.
//!
//! The model is etcd's, reduced to what Hive needs, so that the embedded backend (redb, one
//! machine) and the etcd backend (HA) are interchangeable behind [`Store`]:
//! - one global revision, incremented by every successful transaction that changes something
//!   (all writes of one transaction share its revision; one that changes nothing, such as a
//!   `DeletePrefix` of nothing, takes none), so a watch on every key sees every revision;
//! - every key carries the revision that created it and the one that last modified it;
//! - transactions are atomic and conditional (create-only, update-if-revision,
//!   delete-if-revision): optimistic concurrency without locks;
//! - watches deliver every change after a revision, in order, with the previous value, the
//!   events of one revision together (once the first is yielded the rest are ready); a
//!   watch from a revision that compaction already dropped fails with
//!   [`StoreError::Compacted`] so the caller relists; a watch may also mark where its replay
//!   of history ends ([`Store::watch_synced`]).
//!
//! This crate knows nothing about Hive's resource types: keys are strings, values bytes.

use std::pin::Pin;

use bytes::Bytes;
use futures_util::Stream;

pub mod cache;
pub mod conformance;
pub mod copy;
pub mod etcd_store;
pub mod redb_store;

pub use cache::{WatchCache, WatchCacheOptions};
pub use copy::{CopyReport, copy_all};
pub use etcd_store::{EtcdStore, EtcdStoreOptions, EtcdTls};
pub use redb_store::{RedbStore, RedbStoreOptions};

/// A store-wide revision. Revision 0 means "before anything was written".
pub type Revision = u64;

/// Largest key accepted, in bytes.
pub const MAX_KEY_BYTES: usize = 1024;
/// Largest value accepted, in bytes (etcd's default request limit is 1.5 MiB).
pub const MAX_VALUE_BYTES: usize = 1536 * 1024;
/// Most operations in one transaction (etcd's default `--max-txn-ops`).
pub const MAX_TXN_OPS: usize = 128;

/// A key, its value and the revisions that created and last modified it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Bytes,
    pub create_revision: Revision,
    pub mod_revision: Revision,
}

/// One write of a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Create `key`; the transaction fails if it exists.
    Create { key: String, value: Bytes },
    /// Replace `key`'s value; fails unless `key` exists with exactly `mod_revision`.
    Update {
        key: String,
        value: Bytes,
        mod_revision: Revision,
    },
    /// Create or replace `key` unconditionally.
    Put { key: String, value: Bytes },
    /// Delete `key`; fails if it is missing, or if `mod_revision` is given and differs.
    Delete {
        key: String,
        mod_revision: Option<Revision>,
    },
    /// Delete every key starting with `prefix` (none is fine). One event per deleted key.
    DeletePrefix { prefix: String },
    /// Write nothing; the transaction fails unless `key` exists with exactly `mod_revision`
    /// (etcd: a compare without a write). Guards writes that depend on another object, such
    /// as creating inside a tenant that is being deleted.
    Require { key: String, mod_revision: Revision },
}

impl Op {
    /// The key (or prefix) the operation touches.
    pub fn key(&self) -> &str {
        match self {
            Op::Create { key, .. }
            | Op::Update { key, .. }
            | Op::Put { key, .. }
            | Op::Delete { key, .. }
            | Op::Require { key, .. } => key,
            Op::DeletePrefix { prefix } => prefix,
        }
    }
}

/// Why a transaction's condition did not hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConflictKind {
    /// `Create` of a key that exists (at this revision).
    Exists { mod_revision: Revision },
    /// `Update` or `Delete` of a key that does not exist.
    Missing,
    /// `Update` or `Delete` whose expected revision is not the key's.
    RevisionMismatch {
        expected: Revision,
        actual: Revision,
    },
}

impl std::fmt::Display for ConflictKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConflictKind::Exists { mod_revision } => {
                write!(f, "already exists (revision {mod_revision})")
            }
            ConflictKind::Missing => f.write_str("does not exist"),
            ConflictKind::RevisionMismatch { expected, actual } => {
                write!(f, "expected revision {expected}, found {actual}")
            }
        }
    }
}

/// The result of a successful transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxnResponse {
    /// The revision the transaction committed at; every key it wrote has this `mod_revision`.
    /// For a transaction that changed nothing, the store's revision after it.
    pub revision: Revision,
}

/// A point read: the value (if any) and the store revision the read saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GetResponse {
    pub kv: Option<KeyValue>,
    pub revision: Revision,
}

/// One page of a prefix listing, in key order, and the store revision the read saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListResponse {
    pub kvs: Vec<KeyValue>,
    pub revision: Revision,
    /// More keys follow the last one returned.
    pub more: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change. For a delete, `kv.value` is empty, `kv.mod_revision` is the deleting revision
/// and `kv.create_revision` is 0 (as etcd reports it); `prev` holds the value that was deleted.
/// For a put, `prev` is the value it replaced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    pub kv: KeyValue,
    pub prev: Option<KeyValue>,
}

impl Event {
    pub fn revision(&self) -> Revision {
        self.kv.mod_revision
    }
}

/// A stream of changes in revision order. It ends only with an error (or when dropped).
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<Event, StoreError>> + Send>>;

/// What a [`Store::watch_synced`] stream yields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchItem {
    Event(Event),
    /// Every event under the prefix up to this revision, the store's when the watch opened,
    /// has been yielded: the replay of history is over, what follows is live. Yielded once,
    /// right after the last such event (at once when there is none).
    Synced(Revision),
}

/// A [`WatchStream`] that also marks the end of its replay ([`WatchItem::Synced`]).
pub type SyncedWatchStream = Pin<Box<dyn Stream<Item = Result<WatchItem, StoreError>> + Send>>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("key {key}: {kind}")]
    Conflict { key: String, kind: ConflictKind },
    #[error(
        "revision {requested} is compacted (history starts after revision {compacted}): relist"
    )]
    Compacted {
        requested: Revision,
        compacted: Revision,
    },
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("store backend: {0}")]
    Backend(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The contract of a Hive state backend.
///
/// Every backend must pass [`conformance::run_all`] unchanged.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// Reads one key.
    async fn get(&self, key: &str) -> Result<GetResponse>;

    /// Reads one key as the store holds it now, past any cache in front of it: for a lookup
    /// that must not miss what another server has just written (a new token, say). Backends
    /// without a cache answer it as [`Store::get`].
    async fn get_uncached(&self, key: &str) -> Result<GetResponse> {
        self.get(key).await
    }

    /// Lists keys starting with `prefix` in key order, strictly after `start_after` when given,
    /// at most `limit` of them (`limit` 0 means no limit). One page is one consistent snapshot.
    async fn list(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<ListResponse>;

    /// Applies `ops` atomically at one new revision if every condition holds; otherwise applies
    /// nothing and returns [`StoreError::Conflict`] for the first failed condition. An empty
    /// `ops` is invalid. [`StoreError::Unavailable`] means the outcome is not known (the
    /// backend lost contact after sending it): re-read before retrying.
    async fn txn(&self, ops: Vec<Op>) -> Result<TxnResponse>;

    /// Every change under `prefix` with a revision greater than `after`, in revision order
    /// (then key order within a revision), first the history and then live. If `after` is older
    /// than the compacted revision, fails with [`StoreError::Compacted`] (at once, or as the
    /// stream's next item if compaction overtakes a slow watcher). A watcher that falls behind
    /// never blocks writers: it catches up from history.
    async fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream>;

    /// [`Store::watch`], and once every event up to the store's revision at the call has been
    /// yielded, [`WatchItem::Synced`] with that revision: a watcher resuming from `after`
    /// knows when it has caught up without waiting for a quiet spell (there may be no event
    /// under the prefix at all). The events are exactly [`Store::watch`]'s.
    async fn watch_synced(&self, prefix: &str, after: Revision) -> Result<SyncedWatchStream>;

    /// The latest committed revision.
    async fn current_revision(&self) -> Result<Revision>;

    /// Drops the history at and before `revision`: watches from an `after` lower than
    /// `revision` then fail with [`StoreError::Compacted`]. Current values are kept.
    async fn compact(&self, revision: Revision) -> Result<()>;

    /// The revision history was last compacted at (0 when never).
    async fn compacted_revision(&self) -> Result<Revision>;
}

/// Checks the limits shared by every backend: size limits, and that no key is named by two
/// operations of one transaction (a `DeletePrefix` names every key under its prefix), as etcd
/// refuses a "duplicate key given in txn request". Because of the latter, the operations of a
/// valid transaction never see each other's effects, so their order does not matter.
pub fn validate_ops(ops: &[Op]) -> Result<()> {
    if ops.is_empty() {
        return Err(StoreError::Invalid("transaction has no operations".into()));
    }
    if ops.len() > MAX_TXN_OPS {
        return Err(StoreError::Invalid(format!(
            "transaction has {} operations, at most {MAX_TXN_OPS} allowed",
            ops.len()
        )));
    }
    for op in ops {
        let key = op.key();
        if key.is_empty() {
            return Err(StoreError::Invalid("empty key".into()));
        }
        if key.len() > MAX_KEY_BYTES {
            return Err(StoreError::Invalid(format!(
                "key of {} bytes, at most {MAX_KEY_BYTES} allowed",
                key.len()
            )));
        }
        if let Op::Create { value, .. } | Op::Update { value, .. } | Op::Put { value, .. } = op
            && value.len() > MAX_VALUE_BYTES
        {
            return Err(StoreError::Invalid(format!(
                "value of key {key} has {} bytes, at most {MAX_VALUE_BYTES} allowed",
                value.len()
            )));
        }
    }
    check_disjoint(ops)
}

/// Refuses a transaction in which one key is named twice, or lies under a `DeletePrefix` of
/// another operation.
fn check_disjoint(ops: &[Op]) -> Result<()> {
    let mut named: Vec<(&str, bool)> = ops
        .iter()
        .map(|op| (op.key(), matches!(op, Op::DeletePrefix { .. })))
        .collect();
    // Sorted, every key under a prefix sits in one run right after the prefix itself, so
    // looking at each pair of neighbours finds every overlap.
    named.sort_unstable();
    for pair in named.windows(2) {
        let [(first, first_is_prefix), (second, _)] = pair else {
            continue;
        };
        if first == second {
            return Err(StoreError::Invalid(format!(
                "key {first} is named by more than one operation of the transaction"
            )));
        }
        if *first_is_prefix && second.starts_with(first) {
            return Err(StoreError::Invalid(format!(
                "key {second} lies under prefix {first} deleted by the same transaction"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str) -> Op {
        Op::Put {
            key: key.into(),
            value: Bytes::new(),
        }
    }

    fn delete_prefix(prefix: &str) -> Op {
        Op::DeletePrefix {
            prefix: prefix.into(),
        }
    }

    fn is_invalid(ops: &[Op]) -> bool {
        matches!(validate_ops(ops), Err(StoreError::Invalid(_)))
    }

    #[test]
    fn distinct_keys_pass() {
        assert!(validate_ops(&[put("/a"), put("/b"), delete_prefix("/c/"), put("/c")]).is_ok());
        // A prefix of another prefix op's key only matters in that direction.
        assert!(validate_ops(&[delete_prefix("/a/b"), put("/a/")]).is_ok());
    }

    #[test]
    fn a_key_named_twice_is_invalid() {
        assert!(is_invalid(&[put("/a"), put("/b"), put("/a")]));
        assert!(is_invalid(&[
            put("/a"),
            Op::Delete {
                key: "/a".into(),
                mod_revision: None
            }
        ]));
        assert!(is_invalid(&[delete_prefix("/a/"), delete_prefix("/a/")]));
    }

    #[test]
    fn a_key_under_a_deleted_prefix_is_invalid_wherever_it_sorts() {
        assert!(is_invalid(&[put("/a/x"), delete_prefix("/a/")]));
        assert!(is_invalid(&[delete_prefix("/a/"), put("/a/")]));
        assert!(is_invalid(&[
            delete_prefix("/a/"),
            put("/a/b"),
            put("/a/z/y")
        ]));
        // Keys between the prefix and the covered key do not hide the overlap.
        assert!(is_invalid(&[
            delete_prefix("/a/"),
            put("/a/0"),
            put("/a/zz"),
            put("/b")
        ]));
        assert!(is_invalid(&[delete_prefix("/a"), delete_prefix("/a/b/")]));
    }

    #[test]
    fn size_limits() {
        assert!(is_invalid(&[]));
        assert!(is_invalid(&[put("")]));
        assert!(is_invalid(&[put(&"k".repeat(MAX_KEY_BYTES + 1))]));
        assert!(validate_ops(&[put(&"k".repeat(MAX_KEY_BYTES))]).is_ok());
        let ops: Vec<Op> = (0..=MAX_TXN_OPS).map(|i| put(&format!("/{i}"))).collect();
        assert!(is_invalid(&ops));
        assert!(validate_ops(&ops[..MAX_TXN_OPS]).is_ok());
    }
}
