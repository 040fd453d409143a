//! Runs the backend-neutral conformance suite on [`EtcdStore`], each case against its own
//! fresh single-member etcd (a real `/usr/bin/etcd`, see `support`).

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use hive_store::{
    EtcdStore, GetResponse, ListResponse, Op, Result, Revision, Store, TxnResponse, WatchCache,
    WatchCacheOptions, WatchStream, conformance,
};
use support::EtcdCluster;

/// An [`EtcdStore`] that owns its etcd: dropped after its case, it stops the member.
struct OwnEtcd {
    store: EtcdStore,
    _etcd: EtcdCluster,
}

#[async_trait]
impl Store for OwnEtcd {
    async fn get(&self, key: &str) -> Result<GetResponse> {
        self.store.get(key).await
    }
    async fn list(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<ListResponse> {
        self.store.list(prefix, start_after, limit).await
    }
    async fn txn(&self, ops: Vec<Op>) -> Result<TxnResponse> {
        self.store.txn(ops).await
    }
    async fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream> {
        self.store.watch(prefix, after).await
    }
    async fn watch_synced(
        &self,
        prefix: &str,
        after: Revision,
    ) -> Result<hive_store::SyncedWatchStream> {
        self.store.watch_synced(prefix, after).await
    }
    async fn current_revision(&self) -> Result<Revision> {
        self.store.current_revision().await
    }
    async fn compact(&self, revision: Revision) -> Result<()> {
        self.store.compact(revision).await
    }
    async fn compacted_revision(&self) -> Result<Revision> {
        self.store.compacted_revision().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_passes_the_conformance_suite() {
    let started = AtomicUsize::new(0);
    conformance::run_all(|| {
        started.fetch_add(1, Ordering::Relaxed);
        let etcd = EtcdCluster::start(1);
        let options = etcd.store_options();
        async move {
            let store = EtcdStore::connect(options).await.expect("connect to etcd");
            OwnEtcd { store, _etcd: etcd }
        }
    })
    .await;
    let stores = started.load(Ordering::Relaxed);
    assert!(
        stores >= 20,
        "each case runs on its own etcd, only {stores} were started"
    );
}

/// etcd's own numbering shows through: its first write is revision 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revisions_are_etcds() {
    let etcd = EtcdCluster::start(1);
    let store = EtcdStore::connect(etcd.store_options())
        .await
        .expect("connect");
    assert_eq!(store.current_revision().await.expect("revision"), 1);
    let written = store
        .txn(vec![Op::Put {
            key: "/r/a".into(),
            value: "v".into(),
        }])
        .await
        .expect("txn");
    assert_eq!(written.revision, 2);
}

/// The watch cache in front of etcd keeps the contract: the same suite, unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watch_cache_over_etcd_passes_the_conformance_suite() {
    conformance::run_all(|| {
        let etcd = EtcdCluster::start(1);
        let options = etcd.store_options();
        async move {
            let store = EtcdStore::connect(options).await.expect("connect to etcd");
            let own: std::sync::Arc<dyn Store> =
                std::sync::Arc::new(OwnEtcd { store, _etcd: etcd });
            WatchCache::start(own, WatchCacheOptions::default())
                .await
                .expect("start the watch cache")
        }
    })
    .await;
}
