//! The etcd backend over TLS with client certificates, against a real etcd started with
//! `--client-cert-auth` (certificates made with the `openssl` command).

mod support;

use std::time::Duration;

use bytes::Bytes;
use hive_store::{EtcdStore, EtcdTls, Op, Store, StoreError};
use support::{EtcdCluster, TestCerts};

fn read(path: &std::path::Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_client_certificate() {
    let certs = TestCerts::generate();
    let etcd = EtcdCluster::start_tls(&certs);
    let mut options = etcd.store_options();
    assert!(options.endpoints[0].starts_with("https://"));
    options.tls = Some(EtcdTls {
        ca_pem: Some(read(&certs.ca)),
        identity: Some((read(&certs.client_cert), read(&certs.client_key))),
    });
    let store = EtcdStore::connect(options.clone())
        .await
        .expect("connect over TLS");
    let written = store
        .txn(vec![Op::Put {
            key: "/tls/a".into(),
            value: Bytes::from_static(b"v"),
        }])
        .await
        .expect("write over TLS");
    let kv = store.get("/tls/a").await.expect("get").kv.expect("key");
    assert_eq!(kv.mod_revision, written.revision);

    // Without a client certificate etcd refuses the connection: a clear, bounded failure.
    options.tls = Some(EtcdTls {
        ca_pem: Some(read(&certs.ca)),
        identity: None,
    });
    options.connect_timeout = Duration::from_secs(2);
    match EtcdStore::connect(options.clone()).await {
        Err(StoreError::Unavailable(message)) => {
            assert!(message.contains(&options.endpoints[0]), "{message}");
        }
        other => panic!("expected Unavailable without a client certificate, got {other:?}"),
    }

    // TLS settings without a CA are refused before anything is sent.
    options.tls = Some(EtcdTls::default());
    assert!(matches!(
        EtcdStore::connect(options).await,
        Err(StoreError::Invalid(_))
    ));
}
