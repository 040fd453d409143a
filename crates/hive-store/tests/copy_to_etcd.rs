//! `copy_all` from the embedded store into a real etcd: every key with its exact value, the
//! revisions renumbered, and refusals when the destination is not empty.

mod support;

use bytes::Bytes;
use hive_store::{EtcdStore, Op, RedbStore, RedbStoreOptions, Store, StoreError, copy_all};
use support::EtcdCluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_from_redb_into_etcd_keeps_every_value() {
    let dir = tempfile::tempdir().expect("temp dir");
    let redb = RedbStore::open(dir.path().join("state.redb"), RedbStoreOptions::default())
        .expect("open redb");
    // Enough keys for several pages and batches, two values that need a batch each, keys that
    // were updated and deleted (so the source's revisions have nothing to do with the copy's).
    for chunk in 0..10 {
        let ops: Vec<Op> = (0..120)
            .map(|i| Op::Put {
                key: format!("/t/acme/services/s{chunk:02}-{i:03}"),
                value: Bytes::from(format!("{{\"n\":{i},\"chunk\":{chunk}}}")),
            })
            .collect();
        redb.txn(ops).await.expect("fill");
    }
    for big in ["/big/a", "/big/b"] {
        redb.txn(vec![Op::Put {
            key: big.into(),
            value: Bytes::from(vec![b'x'; 1024 * 1024]),
        }])
        .await
        .expect("big value");
    }
    redb.txn(vec![Op::DeletePrefix {
        prefix: "/t/acme/services/s03-".into(),
    }])
    .await
    .expect("delete some");
    redb.txn(vec![Op::Put {
        key: "/t/acme/services/s00-000".into(),
        value: Bytes::from_static(b"updated"),
    }])
    .await
    .expect("update one");

    let etcd = EtcdCluster::start(1);
    let store = EtcdStore::connect(etcd.store_options())
        .await
        .expect("connect");
    let report = copy_all(&redb, &store).await.expect("copy");
    let source = redb.list("", None, 0).await.expect("list source");
    let copied = store.list("", None, 0).await.expect("list copy");
    assert_eq!(report.keys, source.kvs.len());
    assert_eq!(report.keys, 10 * 120 - 120 + 2);
    assert_eq!(report.source_revision, source.revision);
    let pairs = |kvs: &[hive_store::KeyValue]| -> Vec<(String, Bytes)> {
        kvs.iter()
            .map(|kv| (kv.key.clone(), kv.value.clone()))
            .collect()
    };
    assert_eq!(pairs(&copied.kvs), pairs(&source.kvs));
    // Revisions are etcd's own: batches of writes from revision 2.
    assert!(copied.kvs.iter().all(|kv| kv.mod_revision >= 2));
    assert_eq!(report.destination_revision, copied.revision);
    assert!(report.destination_revision < source.revision);

    // A second copy into the same etcd is refused, and writes nothing.
    match copy_all(&redb, &store).await {
        Err(StoreError::Invalid(message)) => assert!(message.contains("not empty"), "{message}"),
        other => panic!("copy into a non-empty store gave {other:?}"),
    }
    assert_eq!(
        store.current_revision().await.expect("revision"),
        report.destination_revision
    );
}
