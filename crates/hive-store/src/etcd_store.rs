//! The etcd backend: Hive's state in an etcd cluster, so that several API servers share it.
//!
//! The [`Store`] model is etcd's, so the mapping is direct:
//! - revisions are etcd's revisions (a fresh etcd is at revision 1 and its first write is 2);
//! - a transaction is one etcd txn: its conditions are compares on `create_revision`,
//!   `version` and `mod_revision`, its writes are sorted by key (so that the events of one
//!   revision come in key order, as the contract says), and its failure branch reads every
//!   compared key, so that the conflict reported is decided on the same snapshot the compares
//!   saw ([`txn`]);
//! - a watch is an etcd watch from `after + 1` with previous values, resumed from the last
//!   revision received on another member when its member fails ([`watch`]);
//! - compaction is etcd's; an etcd "required revision has been compacted" becomes
//!   [`StoreError::Compacted`] with the compacted revision etcd reports.
//!
//! One thing differs from the embedded backend: etcd gives no revision to a transaction that
//! changes nothing (only `Require`s, or a `DeletePrefix` that matches nothing). Such a
//! transaction returns the store's current revision instead; the contract allows both.
//!
//! Members and failover live in [`members`]: etcd-client does not move between endpoints by
//! itself, so Hive keeps one channel per member, uses one at a time, health-checks the others
//! when it fails and moves on. Reads, watches and compaction are retried on the next member;
//! a write only when it provably never reached etcd (see [`members::Failure`]), otherwise it
//! fails with [`StoreError::Unavailable`] saying its outcome is unknown, and the caller
//! re-reads before deciding anything (as etcd's own Go client and Kubernetes do).
//!
//! This module owns the etcd protocol; it knows nothing of what keys and values mean.

mod members;
mod txn;
mod watch;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use etcd_client::{GetOptions, WatchOptions};

use self::members::{Failure, Member, Members};
use crate::{
    GetResponse, KeyValue, ListResponse, Op, Result, Revision, Store, StoreError,
    SyncedWatchStream, TxnResponse, WatchStream, validate_ops,
};

/// Where the etcd members are and how to talk to them.
#[derive(Clone, Debug)]
pub struct EtcdStoreOptions {
    /// `http://host:port` or `https://host:port` of every member to use, in order of preference.
    pub endpoints: Vec<String>,
    /// TLS settings; required for `https://` endpoints.
    pub tls: Option<EtcdTls>,
    /// Bound on one request to one member.
    pub request_timeout: Duration,
    /// How long an operation keeps looking for a healthy member (with backoff) before it
    /// fails with [`StoreError::Unavailable`]. A leader election takes about a second.
    pub failover_timeout: Duration,
    /// How long [`EtcdStore::connect`] waits for a first healthy member.
    pub connect_timeout: Duration,
}

/// TLS towards etcd (`--etcd-ca`, `--etcd-cert`, `--etcd-key`).
#[derive(Clone, Default)]
pub struct EtcdTls {
    /// PEM of the CA that signed the members' certificates.
    pub ca_pem: Option<Vec<u8>>,
    /// PEM certificate and key that identify Hive to etcd (`--client-cert-auth`).
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

/// Never prints the key.
impl std::fmt::Debug for EtcdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdTls")
            .field("ca", &self.ca_pem.is_some())
            .field("client_certificate", &self.identity.is_some())
            .finish()
    }
}

impl Default for EtcdStoreOptions {
    fn default() -> Self {
        Self {
            endpoints: Vec::new(),
            tls: None,
            request_timeout: Duration::from_secs(5),
            failover_timeout: Duration::from_secs(15),
            connect_timeout: Duration::from_secs(30),
        }
    }
}

impl EtcdStoreOptions {
    /// Parses `etcd://HOST:PORT[,HOST:PORT…]` (plain) or `etcds://…` (TLS).
    pub fn from_url(url: &str) -> Result<Self> {
        let (scheme, rest, tls) = if let Some(rest) = url.strip_prefix("etcd://") {
            ("http", rest, None)
        } else if let Some(rest) = url.strip_prefix("etcds://") {
            ("https", rest, Some(EtcdTls::default()))
        } else {
            return Err(StoreError::Invalid(format!(
                "store url {url}: expected etcd://HOST:PORT[,HOST:PORT…] or etcds://…"
            )));
        };
        let mut endpoints = Vec::new();
        for member in rest.split(',') {
            let member = member.trim().trim_end_matches('/');
            let valid = member
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !valid {
                return Err(StoreError::Invalid(format!(
                    "store url {url}: member {member:?} is not HOST:PORT"
                )));
            }
            endpoints.push(format!("{scheme}://{member}"));
        }
        Ok(Self {
            endpoints,
            tls,
            ..Self::default()
        })
    }
}

/// The [`Store`] on an etcd cluster. Cheap to clone: clones share the members' channels.
#[derive(Clone)]
pub struct EtcdStore {
    members: Arc<Members>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.members.urls())
            .finish_non_exhaustive()
    }
}

impl EtcdStore {
    /// Connects, waiting (with backoff, up to `connect_timeout`) until one member answers a
    /// linearizable read, so that a store that returns is usable.
    pub async fn connect(options: EtcdStoreOptions) -> Result<Self> {
        let members = Members::connect(options).await?;
        Ok(Self {
            members: Arc::new(members),
        })
    }

    /// The member requests go to now (for logs and tests).
    pub fn current_endpoint(&self) -> String {
        self.members.current_url()
    }

    /// Reads `key` at `revision` (0: latest), only to learn whether that revision is still in
    /// the history; `Ok(())` also for a revision in the future.
    async fn check_not_compacted(&self, revision: Revision, requested: Revision) -> Result<()> {
        let options = GetOptions::new()
            .with_count_only()
            .with_revision(etcd_revision(revision)?);
        let outcome = self
            .members
            .read("read history", move |mut m: Member| {
                let options = options.clone();
                async move { m.kv.get(PROBE_KEY, Some(options)).await }
            })
            .await;
        match outcome {
            Ok(_) | Err(Failure::FutureRevision) => Ok(()),
            Err(Failure::Compacted) => Err(StoreError::Compacted {
                requested,
                compacted: self.compacted_revision().await?,
            }),
            Err(other) => Err(other.into_store_error("read history")),
        }
    }
}

/// A key Hive never writes (its keys start with `/`), read only for a response header.
const PROBE_KEY: &[u8] = b"\0";

#[async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<GetResponse> {
        let owned = key.to_owned();
        let mut response = self
            .members
            .read("get", move |mut m: Member| {
                let key = owned.clone();
                async move { m.kv.get(key, None).await }
            })
            .await
            .map_err(|f| f.into_store_error(&format!("get {key}")))?;
        let revision = header_revision(response.header())?;
        let kv = match response.take_kvs().into_iter().next() {
            Some(kv) => Some(key_value(&kv)?),
            None => None,
        };
        Ok(GetResponse { kv, revision })
    }

    async fn list(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<ListResponse> {
        let (mut from, end) = prefix_range(prefix);
        if let Some(after) = start_after {
            // The smallest key strictly after `after`.
            let mut next = after.as_bytes().to_vec();
            next.push(0);
            from = from.max(next);
        }
        if end != [0] && from >= end {
            return Ok(ListResponse {
                kvs: Vec::new(),
                revision: self.current_revision().await?,
                more: false,
            });
        }
        let mut options = GetOptions::new().with_range(end);
        if limit > 0 {
            options = options.with_limit(i64::try_from(limit).unwrap_or(i64::MAX));
        }
        let mut response = self
            .members
            .read("list", move |mut m: Member| {
                let (from, options) = (from.clone(), options.clone());
                async move { m.kv.get(from, Some(options)).await }
            })
            .await
            .map_err(|f| f.into_store_error(&format!("list {prefix}")))?;
        let revision = header_revision(response.header())?;
        let more = response.more();
        let kvs = response
            .take_kvs()
            .iter()
            .map(key_value)
            .collect::<Result<Vec<_>>>()?;
        Ok(ListResponse {
            kvs,
            revision,
            more,
        })
    }

    async fn txn(&self, ops: Vec<Op>) -> Result<TxnResponse> {
        validate_ops(&ops)?;
        let plan = txn::Plan::new(&ops);
        let request = plan.request();
        let response = self
            .members
            .write("txn", move |mut m: Member| {
                let request = request.clone();
                async move { m.kv.txn(request).await }
            })
            .await
            .map_err(|f| f.into_store_error(&format!("txn on {}", ops[0].key())))?;
        plan.outcome(&response)
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream> {
        // etcd refuses only a start revision *below* its compaction point, and has nothing at
        // its first revision (1): a read at `after` (at least 1) is refused exactly when
        // `after` is below it, which is the contract's condition.
        self.check_not_compacted(after.max(1), after).await?;
        let (key, end) = prefix_range(prefix);
        watch::open(Arc::clone(&self.members), key, end, after).await
    }

    async fn watch_synced(&self, prefix: &str, after: Revision) -> Result<SyncedWatchStream> {
        self.check_not_compacted(after.max(1), after).await?;
        let at = self.current_revision().await?;
        let (key, end) = prefix_range(prefix);
        watch::open_synced(Arc::clone(&self.members), key, end, after, Some(at)).await
    }

    async fn current_revision(&self) -> Result<Revision> {
        let response = self
            .members
            .read("read revision", |mut m: Member| async move {
                m.kv.get(PROBE_KEY, Some(GetOptions::new().with_count_only()))
                    .await
            })
            .await
            .map_err(|f| f.into_store_error("read revision"))?;
        header_revision(response.header())
    }

    async fn compact(&self, revision: Revision) -> Result<()> {
        if revision == 0 {
            return Ok(());
        }
        let target = etcd_revision(revision)?;
        // Idempotent: compacting again is refused as compacted, which is success here.
        let outcome = self
            .members
            .read("compact", move |mut m: Member| async move {
                m.kv.compact(target, None).await
            })
            .await;
        match outcome {
            Ok(_) | Err(Failure::Compacted) => Ok(()),
            Err(Failure::FutureRevision) => Err(StoreError::Invalid(format!(
                "compact to revision {revision}: beyond the current revision"
            ))),
            Err(other) => Err(other.into_store_error(&format!("compact to {revision}"))),
        }
    }

    async fn compacted_revision(&self) -> Result<Revision> {
        // etcd does not report its compaction point directly. A read at revision 1 succeeds
        // unless history was compacted beyond it; then a watch from revision 1 is answered at
        // once with the compacted revision. (A compaction at exactly 1 reads as 0: etcd's
        // revision 1 is its empty initial state, so no history was dropped.)
        let read_first = self
            .members
            .read("read history", |mut m: Member| async move {
                let options = GetOptions::new().with_count_only().with_revision(1);
                m.kv.get(PROBE_KEY, Some(options)).await
            })
            .await;
        match read_first {
            Ok(_) => Ok(0),
            Err(Failure::Compacted) => watch::compacted_revision(&self.members).await,
            Err(other) => Err(other.into_store_error("read history")),
        }
    }
}

/// The etcd key range of a prefix: `[prefix, end)`, where an end of `[0]` means "to the last
/// key" and the empty prefix is every key.
fn prefix_range(prefix: &str) -> (Vec<u8>, Vec<u8>) {
    let key = prefix.as_bytes().to_vec();
    if key.is_empty() {
        return (vec![0], vec![0]);
    }
    let mut end = key.clone();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return (key, end);
        }
    }
    (key, vec![0])
}

fn etcd_revision(revision: Revision) -> Result<i64> {
    i64::try_from(revision)
        .map_err(|_| StoreError::Invalid(format!("revision {revision} is out of range")))
}

fn header_revision(header: Option<&etcd_client::ResponseHeader>) -> Result<Revision> {
    let header =
        header.ok_or_else(|| StoreError::Backend("etcd response without a header".into()))?;
    revision_from(header.revision())
}

fn revision_from(revision: i64) -> Result<Revision> {
    Revision::try_from(revision)
        .map_err(|_| StoreError::Backend(format!("etcd returned revision {revision}")))
}

fn key_value(kv: &etcd_client::KeyValue) -> Result<KeyValue> {
    let key = std::str::from_utf8(kv.key())
        .map_err(|_| StoreError::Backend(format!("etcd key {:?} is not UTF-8", kv.key())))?;
    Ok(KeyValue {
        key: key.to_owned(),
        value: Bytes::copy_from_slice(kv.value()),
        create_revision: revision_from(kv.create_revision())?,
        mod_revision: revision_from(kv.mod_revision())?,
    })
}

/// The watch options of a resumed or new watch: the key range, with previous values, from
/// `start` (etcd's start revision is inclusive).
fn watch_options(end: &[u8], start: Revision) -> Result<WatchOptions> {
    Ok(WatchOptions::new()
        .with_range(end.to_vec())
        .with_prev_key()
        .with_start_revision(etcd_revision(start)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ranges() {
        assert_eq!(prefix_range(""), (vec![0], vec![0]));
        assert_eq!(prefix_range("/a/"), (b"/a/".to_vec(), b"/a0".to_vec()));
    }

    #[test]
    fn store_urls() {
        let plain = EtcdStoreOptions::from_url("etcd://10.0.0.1:2379,etcd-b:2379").unwrap();
        assert_eq!(
            plain.endpoints,
            vec!["http://10.0.0.1:2379", "http://etcd-b:2379"]
        );
        assert!(plain.tls.is_none());
        let tls = EtcdStoreOptions::from_url("etcds://[::1]:2379").unwrap();
        assert_eq!(tls.endpoints, vec!["https://[::1]:2379"]);
        assert!(tls.tls.is_some());
        for bad in [
            "http://a:1",
            "etcd://",
            "etcd://a",
            "etcd://a:x",
            "etcd://a:1,",
        ] {
            assert!(
                matches!(EtcdStoreOptions::from_url(bad), Err(StoreError::Invalid(_))),
                "{bad}"
            );
        }
    }
}
