//! Runs the backend-neutral conformance suite on [`RedbStore`], plus the cases only the redb
//! backend can force (a tiny watch buffer, reopening the file).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use hive_store::{
    Event, Op, RedbStore, RedbStoreOptions, Store, StoreError, WatchCache, WatchCacheOptions,
    WatchStream, conformance,
};

fn open(dir: &tempfile::TempDir, name: &str, options: RedbStoreOptions) -> RedbStore {
    RedbStore::open(dir.path().join(name), options).expect("open store")
}

/// The next item of a watch, failing the test instead of hanging.
async fn next(watch: &mut WatchStream) -> Option<Result<Event, StoreError>> {
    tokio::time::timeout(Duration::from_secs(20), watch.next())
        .await
        .expect("no watch item within 20s")
}

fn put(key: &str, value: &str) -> Op {
    Op::Put {
        key: key.into(),
        value: Bytes::copy_from_slice(value.as_bytes()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redb_passes_the_conformance_suite() {
    let root = tempfile::tempdir().expect("temp dir");
    let counter = AtomicUsize::new(0);
    conformance::run_all(|| {
        let n = counter.fetch_add(1, Ordering::Relaxed);
        let store = open(
            &root,
            &format!("store-{n}.redb"),
            RedbStoreOptions::default(),
        );
        async move { store }
    })
    .await;
    let stores = counter.load(Ordering::Relaxed);
    assert!(
        stores >= 20,
        "each case runs on its own store, only {stores} were opened"
    );
}

/// With a watch buffer of 4, a watcher that does not read is cut off almost at once; it must
/// still get everything from the log, and compaction overtaking it must end it.
/// The watch cache in front of redb keeps the contract: the same suite, unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watch_cache_over_redb_passes_the_conformance_suite() {
    let root = tempfile::tempdir().expect("temp dir");
    let counter = AtomicUsize::new(0);
    conformance::run_all(|| {
        let n = counter.fetch_add(1, Ordering::Relaxed);
        let store: Arc<dyn Store> = Arc::new(open(
            &root,
            &format!("store-{n}.redb"),
            RedbStoreOptions::default(),
        ));
        async move {
            WatchCache::start(store, WatchCacheOptions::default())
                .await
                .expect("start the watch cache")
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_cut_off_by_a_tiny_buffer_catches_up_then_hits_compaction() {
    let root = tempfile::tempdir().expect("temp dir");
    let options = RedbStoreOptions {
        watch_buffer: 4,
        watch_page: 16,
        ..RedbStoreOptions::default()
    };
    let store = Arc::new(open(&root, "tiny.redb", options));

    let mut caught_up = store.watch("/t/", 0).await.expect("watch");
    let mut overtaken = store.watch("/t/", 0).await.expect("watch");
    // One event each first, so both are live (registered with the hub) when they stop reading.
    store.txn(vec![put("/t/first", "v")]).await.expect("txn");
    for watch in [&mut caught_up, &mut overtaken] {
        assert_eq!(
            next(watch)
                .await
                .expect("event")
                .expect("event")
                .kv
                .mod_revision,
            1
        );
    }
    let mut tasks = Vec::new();
    for w in 0..10 {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            for i in 0..30 {
                store
                    .txn(vec![put(&format!("/t/{w}"), &i.to_string())])
                    .await
                    .expect("txn");
            }
        }));
    }
    for task in tasks {
        task.await.expect("writer");
    }
    for expected in 2..=301 {
        let event = next(&mut caught_up)
            .await
            .expect("stream ended")
            .expect("event");
        assert_eq!(event.kv.mod_revision, expected);
    }

    store.compact(301).await.expect("compact");
    let mut seen = 1;
    let err = loop {
        match next(&mut overtaken)
            .await
            .expect("stream ended without error")
        {
            Ok(event) => {
                seen += 1;
                assert_eq!(event.kv.mod_revision, seen);
            }
            Err(err) => break err,
        }
    };
    assert!(
        seen <= 1 + 4,
        "only the buffered revisions can come before the error, got {seen}"
    );
    assert!(
        matches!(err, StoreError::Compacted { compacted: 301, .. }),
        "{err}"
    );
    assert!(
        next(&mut overtaken).await.is_none(),
        "the stream must end after Compacted"
    );
}

/// Everything committed is there after a clean reopen, and revisions continue from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reopening_keeps_values_revisions_log_and_compaction() {
    let root = tempfile::tempdir().expect("temp dir");
    {
        let store = open(&root, "reopen.redb", RedbStoreOptions::default());
        for i in 0..10 {
            store
                .txn(vec![put(&format!("/r/{i}"), "v")])
                .await
                .expect("txn");
        }
        store.compact(4).await.expect("compact");
    }
    let store = open(&root, "reopen.redb", RedbStoreOptions::default());
    assert_eq!(store.current_revision().await.expect("revision"), 10);
    assert_eq!(store.compacted_revision().await.expect("compacted"), 4);
    assert_eq!(
        store.list("/r/", None, 0).await.expect("list").kvs.len(),
        10
    );
    assert!(matches!(
        store.watch("/r/", 3).await,
        Err(StoreError::Compacted { .. })
    ));
    let mut watch = store.watch("/r/", 4).await.expect("watch");
    for expected in 5..=10 {
        let event = next(&mut watch).await.expect("event").expect("event");
        assert_eq!(event.kv.mod_revision, expected);
    }
    assert_eq!(
        store
            .txn(vec![put("/r/next", "v")])
            .await
            .expect("txn")
            .revision,
        11
    );
    assert_eq!(
        next(&mut watch)
            .await
            .expect("event")
            .expect("event")
            .kv
            .mod_revision,
        11
    );
}

/// Compaction in chunks far smaller than the history still removes all of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_in_small_chunks_finishes() {
    let root = tempfile::tempdir().expect("temp dir");
    let options = RedbStoreOptions {
        compact_chunk: 7,
        ..RedbStoreOptions::default()
    };
    let store = open(&root, "chunks.redb", options);
    let ops: Vec<Op> = (0..100).map(|i| put(&format!("/c/{i:03}"), "v")).collect();
    store.txn(ops).await.expect("txn of 100 events");
    store.txn(vec![put("/c/last", "v")]).await.expect("txn");
    store.compact(1).await.expect("compact");
    let mut watch = store.watch("/c/", 1).await.expect("watch");
    let event = next(&mut watch).await.expect("event").expect("event");
    assert_eq!(
        (event.kv.key.as_str(), event.kv.mod_revision),
        ("/c/last", 2)
    );
    drop(watch);
    drop(store);
    // The trimmed log is gone from the file, not only hidden.
    let db = redb::Database::open(root.path().join("chunks.redb")).expect("reopen raw");
    let rtxn = redb::ReadableDatabase::begin_read(&db).expect("read");
    let log: redb::TableDefinition<(u64, u32), &[u8]> = redb::TableDefinition::new("log");
    let log = rtxn.open_table(log).expect("log table");
    assert_eq!(redb::ReadableTableMetadata::len(&log).expect("len"), 1);
}

/// Dropping the last handle stops the writer and ends live watches with an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_store_ends_watches() {
    let root = tempfile::tempdir().expect("temp dir");
    let store = open(&root, "drop.redb", RedbStoreOptions::default());
    let mut watch = store.watch("", 0).await.expect("watch");
    store.txn(vec![put("/d/1", "v")]).await.expect("txn");
    assert!(next(&mut watch).await.expect("event").is_ok());
    drop(store);
    let end = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("watch hangs");
    assert!(
        matches!(end, Some(Err(StoreError::Unavailable(_)))),
        "{end:?}"
    );
    assert!(next(&mut watch).await.is_none());
}
