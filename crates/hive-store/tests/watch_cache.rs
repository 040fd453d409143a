//! The watch cache's own promises, beyond the conformance suite it also passes: reads see
//! what was committed elsewhere once asked, watchers that fall behind its history go on
//! without a gap, and a cache cut off from its store refuses to answer beyond its staleness
//! bound, then recovers.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use hive_store::{
    EtcdStore, Op, RedbStore, Store, StoreError, WatchCache, WatchCacheOptions, WatchStream,
};
use support::EtcdCluster;

fn put(key: &str, value: &str) -> Op {
    Op::Put {
        key: key.into(),
        value: Bytes::copy_from_slice(value.as_bytes()),
    }
}

fn redb(dir: &tempfile::TempDir) -> Arc<dyn Store> {
    Arc::new(RedbStore::open(dir.path().join("state.redb"), Default::default()).expect("open"))
}

async fn next(watch: &mut WatchStream) -> hive_store::Event {
    tokio::time::timeout(Duration::from_secs(20), watch.next())
        .await
        .expect("no event within 20 s")
        .expect("stream ended")
        .expect("watch error")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_see_own_writes_at_once_and_others_once_asked() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = redb(&dir);
    let cache = WatchCache::start(store.clone(), WatchCacheOptions::default())
        .await
        .expect("start");
    // Through the cache: every read right after a write sees it.
    for i in 0..200 {
        let value = i.to_string();
        cache.txn(vec![put("/own", &value)]).await.expect("write");
        let got = cache.get("/own").await.expect("get").kv.expect("written");
        assert_eq!(got.value, Bytes::from(value), "read after write {i}");
        let listed = cache.list("/own", None, 0).await.expect("list");
        assert_eq!(listed.kvs.len(), 1);
        assert!(listed.revision >= got.mod_revision);
    }
    // Behind the cache's back (another server's write): seen once its revision is asked for.
    for i in 0..200 {
        let rev = store
            .txn(vec![put("/other", &i.to_string())])
            .await
            .expect("write")
            .revision;
        cache.wait_for(rev).await.expect("wait for the revision");
        let got = cache.get("/other").await.expect("get").kv.expect("written");
        assert_eq!(got.mod_revision, rev, "read at revision {rev}");
    }
    // A revision the store never reached (a client of another history) asks for no more
    // than the store has.
    let current = store.current_revision().await.expect("revision");
    tokio::time::timeout(Duration::from_secs(2), cache.wait_for(current + 1_000_000))
        .await
        .expect("a future revision is not waited for")
        .expect("answered at the current revision");
    assert_eq!(cache.revision(), current);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_that_falls_out_of_the_history_goes_on_from_the_store_without_a_gap() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = redb(&dir);
    let options = WatchCacheOptions {
        history: 8,
        ..Default::default()
    };
    let cache = WatchCache::start(store, options).await.expect("start");
    let from = cache.current_revision().await.expect("revision");
    let mut slow = cache.watch("/w/", from).await.expect("watch");
    let mut others = cache.watch("/other/", from).await.expect("watch");
    let mut revisions = Vec::new();
    for i in 0..100 {
        // Two keys per revision: the history's cap falls inside revisions.
        let txn = vec![put(&format!("/w/{i}"), "v"), put(&format!("/w/{i}x"), "v")];
        revisions.push(cache.txn(txn).await.expect("write").revision);
    }
    let other = cache
        .txn(vec![put("/other/k", "v")])
        .await
        .expect("write")
        .revision;
    for (i, rev) in revisions.iter().enumerate() {
        for suffix in ["", "x"] {
            let ev = next(&mut slow).await;
            assert_eq!(
                (ev.kv.key.as_str(), ev.revision()),
                (format!("/w/{i}{suffix}").as_str(), *rev),
                "event {i}{suffix}"
            );
        }
    }
    // A watcher of another prefix skips what is not its own.
    assert_eq!(next(&mut others).await.revision(), other);
    // A watch from before the history comes from the store.
    let mut late = cache.watch("/w/", from).await.expect("watch");
    assert_eq!(next(&mut late).await.revision(), revisions[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_off_from_etcd_the_cache_refuses_reads_beyond_its_bound_then_recovers() {
    let etcd = EtcdCluster::start(1);
    let etcd_options = hive_store::EtcdStoreOptions {
        request_timeout: Duration::from_secs(1),
        failover_timeout: Duration::from_secs(2),
        ..etcd.store_options()
    };
    let store: Arc<dyn Store> = Arc::new(EtcdStore::connect(etcd_options).await.expect("connect"));
    let bound = Duration::from_secs(1);
    let options = WatchCacheOptions {
        max_staleness: bound,
        probe_interval: Duration::from_millis(100),
        ..Default::default()
    };
    let cache = WatchCache::start(store, options).await.expect("start");
    cache.txn(vec![put("/k", "before")]).await.expect("write");
    assert!(cache.get("/k").await.expect("get").kv.is_some());

    etcd.pause(0);
    let stopped = Instant::now();
    let mut refused = None;
    while stopped.elapsed() < Duration::from_secs(4) {
        let asked = stopped.elapsed();
        match cache.get("/k").await {
            // Nothing the cache answers may be older than the bound.
            Ok(_) => assert!(
                asked <= bound,
                "answered {asked:?} after etcd stopped, beyond the {bound:?} bound"
            ),
            Err(StoreError::Unavailable(why)) => {
                refused.get_or_insert((asked, why));
            }
            Err(other) => panic!("unexpected error: {other}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (at, why) = refused.expect("reads were never refused while etcd was stopped");
    assert!(
        at <= bound + Duration::from_millis(500),
        "refused only {at:?} after the stop"
    );
    assert!(why.contains("last matched the store"), "reason: {why}");
    // Its outcome is unknown: etcd may still apply it once it runs again (another key, so
    // that it cannot land over the write after the resume).
    match cache.txn(vec![put("/during", "during")]).await {
        Err(StoreError::Unavailable(_)) => {}
        other => panic!("a write while etcd is stopped gave {other:?}"),
    }

    etcd.resume(0);
    let resumed = Instant::now();
    loop {
        match cache.txn(vec![put("/k", "after")]).await {
            Ok(_) => break,
            Err(_) if resumed.elapsed() < Duration::from_secs(20) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("no write 20 s after etcd resumed: {e}"),
        }
    }
    // Reads resume once a probe finds the cache caught up again.
    let got = loop {
        match cache.get("/k").await {
            Ok(got) => break got.kv.expect("key"),
            Err(_) if resumed.elapsed() < Duration::from_secs(20) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("no read 20 s after etcd resumed: {e}"),
        }
    };
    assert_eq!(got.value, Bytes::from_static(b"after"));
    eprintln!(
        "refused {at:?} after the stop; reading again {:?} after the resume",
        resumed.elapsed()
    );
}

/// A synced watch older than the cache's history is served by the store and still marks the
/// end of its replay once: at the store's revision, after the replayed events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_synced_watch_older_than_the_history_is_marked_by_the_store() {
    use hive_store::WatchItem;
    let dir = tempfile::tempdir().expect("temp dir");
    let store = redb(&dir);
    let options = WatchCacheOptions {
        history: 4,
        ..Default::default()
    };
    let cache = WatchCache::start(store.clone(), options)
        .await
        .expect("start");
    let first = cache
        .txn(vec![put("/s/a", "1")])
        .await
        .expect("write")
        .revision;
    let mut wanted = Vec::new();
    for i in 0..20 {
        cache
            .txn(vec![put(&format!("/elsewhere/{i}"), "1")])
            .await
            .expect("write");
        if i % 5 == 0 {
            wanted.push(
                cache
                    .txn(vec![put("/s/b", "1")])
                    .await
                    .expect("write")
                    .revision,
            );
        }
    }
    let now = cache.current_revision().await.expect("revision");
    let mut watch = cache.watch_synced("/s/", first).await.expect("watch");
    let mut seen = Vec::new();
    loop {
        let item = tokio::time::timeout(Duration::from_secs(20), watch.next())
            .await
            .expect("nothing within 20 s")
            .expect("stream ended")
            .expect("watch error");
        match item {
            WatchItem::Event(e) => seen.push(e.revision()),
            WatchItem::Synced(at) => {
                assert!(at >= now, "marked at {at}, before {now}");
                break;
            }
        }
    }
    assert_eq!(seen, wanted);
    let live = cache
        .txn(vec![put("/s/c", "1")])
        .await
        .expect("write")
        .revision;
    match tokio::time::timeout(Duration::from_secs(20), watch.next()).await {
        Ok(Some(Ok(WatchItem::Event(e)))) => assert_eq!(e.revision(), live),
        other => panic!("expected the live event, got {other:?}"),
    }
}
