//! The embedded backend on redb: one file, durable commits, group commit, watches.
//!
//! Layout of the file (one redb database):
//! - `kv`: key → current value with its create and mod revisions ([`codec`]);
//! - `log`: `(revision, seq)` → one event with the value it replaced, `seq` in key order
//!   within the revision; the watch history, trimmed by compaction;
//! - `meta`: the current revision, the compacted revision and the format version.
//!
//! Writes go through one writer thread ([`writer`]) that batches every pending transaction
//! into one durable redb commit; reads run on tokio's blocking pool, each in one redb read
//! transaction that also reads the revision it saw. Watches ([`watch`]) replay the log and then
//! follow the in-memory [`hub`] the writer publishes to after each commit.
//!
//! This module owns the file format; it knows nothing of what keys and values mean.

mod codec;
mod hub;
mod watch;
mod writer;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;

use async_trait::async_trait;
use redb::{Database, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::oneshot;

use self::hub::Hub;
use self::writer::{Request, Writer};
use crate::{
    GetResponse, ListResponse, Result, Revision, Store, StoreError, SyncedWatchStream, TxnResponse,
    WatchStream, validate_ops,
};

const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
const LOG: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

const REVISION: &str = "revision";
const COMPACTED: &str = "compacted";
const FORMAT: &str = "format";
const FORMAT_VERSION: u64 = 1;

/// Tuning of a [`RedbStore`]; the defaults suit an API server.
#[derive(Clone, Debug)]
pub struct RedbStoreOptions {
    /// Most transactions committed together in one redb write transaction (one fsync).
    pub max_batch: usize,
    /// Revisions a live watcher may have unread before it is cut off and catches up from the
    /// log; bounds the memory a slow watcher holds.
    pub watch_buffer: usize,
    /// Log entries a catching-up watcher reads per read transaction.
    pub watch_page: usize,
    /// Log entries a compaction deletes per write transaction, so that a huge compaction does
    /// not hold up writes in one giant commit.
    pub compact_chunk: usize,
    /// redb's page cache, in bytes.
    pub cache_size_bytes: usize,
}

impl Default for RedbStoreOptions {
    fn default() -> Self {
        Self {
            max_batch: 1024,
            watch_buffer: 1024,
            watch_page: 1024,
            compact_chunk: 10_000,
            cache_size_bytes: 256 * 1024 * 1024,
        }
    }
}

/// The embedded [`Store`] on a redb file.
///
/// Cheap to clone: clones share one database and one writer thread. When the last clone is
/// dropped the writer finishes the batch in hand and stops (the drop waits for it), and live
/// watch streams end with [`StoreError::Unavailable`]. The file stays open until those streams
/// are dropped too. Methods must be called from within a tokio runtime (reads run on its
/// blocking pool).
#[derive(Clone)]
pub struct RedbStore {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    // Both `Some` until dropped: dropping the sender is what stops the writer.
    requests: Option<mpsc::Sender<Request>>,
    writer: Option<JoinHandle<()>>,
}

/// What the writer thread, the readers and the watch streams share.
struct Shared {
    db: Database,
    hub: Arc<Hub>,
    options: RedbStoreOptions,
    path: PathBuf,
}

/// The revisions recorded in `meta`.
#[derive(Clone, Copy, Debug)]
struct Meta {
    revision: Revision,
    compacted: Revision,
}

fn backend<E: fmt::Display>(what: &'static str) -> impl FnOnce(E) -> StoreError {
    move |e| StoreError::Backend(format!("{what}: {e}"))
}

impl RedbStore {
    /// Opens (or creates) the store in the file at `path`, recovering from an unclean
    /// shutdown if needed, and starts its writer thread. Blocking.
    pub fn open(path: impl AsRef<Path>, options: RedbStoreOptions) -> Result<RedbStore> {
        let path = path.as_ref().to_path_buf();
        let db = redb::Builder::new()
            .set_cache_size(options.cache_size_bytes)
            .create(&path)
            .map_err(|e| StoreError::Backend(format!("open {}: {e}", path.display())))?;
        let state = {
            let wtxn = db
                .begin_write()
                .map_err(backend("begin write transaction"))?;
            wtxn.open_table(KV).map_err(backend("create table kv"))?;
            {
                let mut meta = wtxn
                    .open_table(META)
                    .map_err(backend("create table meta"))?;
                let format = meta
                    .get(FORMAT)
                    .map_err(backend("read format version"))?
                    .map(|g| g.value());
                match format {
                    None => {
                        meta.insert(FORMAT, FORMAT_VERSION)
                            .map_err(backend("write format version"))?;
                    }
                    Some(FORMAT_VERSION) => {}
                    Some(other) => {
                        return Err(StoreError::Backend(format!(
                            "{}: unknown store format version {other}",
                            path.display()
                        )));
                    }
                }
            }
            let state = writer::initial_state(&wtxn)?;
            wtxn.commit()
                .map_err(backend("commit store initialisation"))?;
            state
        };
        let shared = Arc::new(Shared {
            db,
            hub: Arc::new(Hub::new(state.revision, options.watch_buffer)),
            options,
            path,
        });
        let (requests, receiver) = mpsc::channel();
        let writer = Writer::new(Arc::clone(&shared), receiver, state);
        let handle = std::thread::Builder::new()
            .name("hive-store-writer".into())
            .spawn(move || writer.run())
            .map_err(|e| StoreError::Backend(format!("start the writer thread: {e}")))?;
        Ok(RedbStore {
            inner: Arc::new(Inner {
                shared,
                requests: Some(requests),
                writer: Some(handle),
            }),
        })
    }

    /// The file the store lives in.
    pub fn path(&self) -> &Path {
        &self.inner.shared.path
    }

    fn send(&self, request: Request) -> Result<()> {
        let requests = self
            .inner
            .requests
            .as_ref()
            .ok_or_else(|| StoreError::Unavailable("store closed".into()))?;
        requests
            .send(request)
            .map_err(|_| StoreError::Unavailable("store writer stopped".into()))
    }

    async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Shared) -> Result<T> + Send + 'static,
    {
        self.inner.shared.blocking(f).await
    }
}

impl fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedbStore")
            .field("path", &self.inner.shared.path)
            .finish_non_exhaustive()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        drop(self.requests.take());
        if let Some(writer) = self.writer.take()
            && writer.join().is_err()
        {
            tracing::error!(path = %self.shared.path.display(), "store writer thread panicked");
        }
    }
}

impl Shared {
    /// Runs a blocking read on tokio's blocking pool.
    async fn blocking<T, F>(self: &Arc<Self>, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Shared) -> Result<T> + Send + 'static,
    {
        let shared = Arc::clone(self);
        tokio::task::spawn_blocking(move || f(&shared))
            .await
            .map_err(|e| StoreError::Backend(format!("read task failed: {e}")))?
    }

    fn begin_read(&self) -> Result<ReadTransaction> {
        self.db
            .begin_read()
            .map_err(backend("begin read transaction"))
    }

    fn read_meta(&self) -> Result<Meta> {
        read_meta_in(&self.begin_read()?)
    }

    fn get(&self, key: &str) -> Result<GetResponse> {
        let rtxn = self.begin_read()?;
        let meta = read_meta_in(&rtxn)?;
        let kv = rtxn.open_table(KV).map_err(backend("open table kv"))?;
        let found = kv
            .get(key)
            .map_err(|e| StoreError::Backend(format!("read key {key}: {e}")))?;
        let kv = found
            .map(|g| codec::decode_value(key, g.value()))
            .transpose()?;
        Ok(GetResponse {
            kv,
            revision: meta.revision,
        })
    }

    fn list(&self, prefix: &str, start_after: Option<&str>, limit: usize) -> Result<ListResponse> {
        let rtxn = self.begin_read()?;
        let meta = read_meta_in(&rtxn)?;
        let kv = rtxn.open_table(KV).map_err(backend("open table kv"))?;
        let scan_err =
            |e: redb::StorageError| StoreError::Backend(format!("list prefix {prefix}: {e}"));
        let range = match start_after {
            Some(after) if after >= prefix => {
                kv.range::<&str>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded))
            }
            _ => kv.range::<&str>(prefix..),
        }
        .map_err(scan_err)?;
        let mut kvs = Vec::new();
        let mut more = false;
        for entry in range {
            let (key, value) = entry.map_err(scan_err)?;
            let key = key.value();
            if !key.starts_with(prefix) {
                break;
            }
            if limit != 0 && kvs.len() == limit {
                more = true;
                break;
            }
            kvs.push(codec::decode_value(key, value.value())?);
        }
        Ok(ListResponse {
            kvs,
            revision: meta.revision,
            more,
        })
    }
}

fn read_meta_in(rtxn: &ReadTransaction) -> Result<Meta> {
    let meta = rtxn.open_table(META).map_err(backend("open table meta"))?;
    let value = |name: &str| -> Result<Revision> {
        Ok(meta
            .get(name)
            .map_err(|e| StoreError::Backend(format!("read meta {name}: {e}")))?
            .map_or(0, |g| g.value()))
    };
    Ok(Meta {
        revision: value(REVISION)?,
        compacted: value(COMPACTED)?,
    })
}

#[async_trait]
impl Store for RedbStore {
    async fn get(&self, key: &str) -> Result<GetResponse> {
        let key = key.to_owned();
        self.read(move |s| s.get(&key)).await
    }

    async fn list(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<ListResponse> {
        let prefix = prefix.to_owned();
        let start_after = start_after.map(str::to_owned);
        self.read(move |s| s.list(&prefix, start_after.as_deref(), limit))
            .await
    }

    async fn txn(&self, ops: Vec<crate::Op>) -> Result<TxnResponse> {
        validate_ops(&ops)?;
        let (reply, answer) = oneshot::channel();
        self.send(Request::Txn { ops, reply })?;
        answer
            .await
            .map_err(|_| StoreError::Unavailable("store writer stopped before answering".into()))?
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream> {
        watch::watch(Arc::clone(&self.inner.shared), prefix.to_owned(), after).await
    }

    async fn watch_synced(&self, prefix: &str, after: Revision) -> Result<SyncedWatchStream> {
        watch::watch_synced(Arc::clone(&self.inner.shared), prefix.to_owned(), after).await
    }

    async fn current_revision(&self) -> Result<Revision> {
        Ok(self.read(|s| s.read_meta()).await?.revision)
    }

    async fn compact(&self, revision: Revision) -> Result<()> {
        let (reply, answer) = oneshot::channel();
        self.send(Request::Compact { revision, reply })?;
        answer
            .await
            .map_err(|_| StoreError::Unavailable("store writer stopped before answering".into()))?
    }

    async fn compacted_revision(&self) -> Result<Revision> {
        Ok(self.read(|s| s.read_meta()).await?.compacted)
    }
}
