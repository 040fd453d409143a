//! One active set of controllers among all API servers sharing a store: leadership is a
//! heartbeat key (`/platform/leader-beat`) that its holder keeps changing, and an epoch key
//! (`/platform/leader`) written once per term.
//!
//! No clock is compared between servers. The leader rewrites the heartbeat every `ttl / 4` (a
//! compare-and-swap on the revision it last wrote, under the condition that the epoch is still
//! its own). A follower reads it just as often and takes over (a compare-and-swap on the
//! revision it saw, writing a new epoch in the same transaction) only once it has seen that
//! same revision for a whole `ttl` of its own monotonic clock. The leader gives up — stops its
//! controllers — when it has not renewed for `ttl / 2` of its own clock, or at once when a
//! renewal finds the key changed. Since a follower's `ttl` starts no earlier than the leader
//! committed the revision it watches, the deposed leader has stopped before anyone can take
//! over, as long as a renewal's round trip is under `ttl / 2`. Clock skew between servers does
//! not matter; only clock rates do: the leader stops first while a follower's clock runs less
//! than twice as fast as its own, and beyond that fencing still keeps every write correct
//! (`crates/hive/tests/ha.rs` runs servers an hour apart at 1.5× and 0.7×).
//!
//! **Fencing.** A term's epoch is the revision its epoch key was written at. The controllers
//! send it with every write (`Hive-Leader-Epoch`), and the server adds "the epoch key is still
//! at that revision" to the write's transaction: a write a deposed leader had in flight fails
//! (409) once another server took over, whatever the clocks.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hive_store::{Op, Revision, Store, StoreError};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;

/// The term: who leads, written when a term begins; its revision is the term's epoch.
pub const LEADER_KEY: &str = "/platform/leader";
/// The heartbeat the leader keeps changing.
pub const BEAT_KEY: &str = "/platform/leader-beat";
/// The request header that carries a controller's epoch.
pub const EPOCH_HEADER: &str = hive_client::LEADER_EPOCH_HEADER;
/// Default time to live: a lost leader is replaced within about this much (plus a poll).
pub const DEFAULT_TTL: Duration = Duration::from_secs(3);

#[derive(Debug, Serialize, Deserialize)]
struct Record {
    holder: String,
    /// How many times this holder renewed (makes every renewal a change).
    renewals: u64,
}

/// Whether this server leads, as the elector sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State {
    Following { leader: Option<String> },
    Leading { since: Revision },
}

/// Competes for leadership as `id` for as long as it runs; the current state is published on
/// `tx`.
pub async fn elect(store: Arc<dyn Store>, id: String, ttl: Duration, tx: watch::Sender<State>) {
    let poll = ttl / 4;
    // What a follower saw last: the revision and since when it has been that one.
    let mut seen: Option<(Revision, Instant)> = None;
    loop {
        let (beat, current) = match (store.get(BEAT_KEY).await, store.get(LEADER_KEY).await) {
            (Ok(b), Ok(l)) => (b.kv, l.kv),
            (Err(e), _) | (_, Err(e)) => {
                tracing::debug!(error = %e, "read the leader keys");
                tokio::time::sleep(poll).await;
                continue;
            }
        };
        let term = Op::Put {
            key: LEADER_KEY.into(),
            value: record(&id, 0),
        };
        let attempt = match &beat {
            None => Some(Op::Create {
                key: BEAT_KEY.into(),
                value: record(&id, 0),
            }),
            Some(kv) => {
                let rev = kv.mod_revision;
                match seen {
                    Some((r, since)) if r == rev && since.elapsed() >= ttl => Some(Op::Update {
                        key: BEAT_KEY.into(),
                        value: record(&id, 0),
                        mod_revision: rev,
                    }),
                    Some((r, _)) if r == rev => None,
                    _ => {
                        seen = Some((rev, Instant::now()));
                        None
                    }
                }
            }
        };
        if let Some(op) = attempt {
            match store.txn(vec![op, term]).await {
                Ok(r) => {
                    tracing::info!(server = %id, revision = r.revision, "leading");
                    let _ = tx.send(State::Leading { since: r.revision });
                    lead(&store, &id, ttl, r.revision).await;
                    tracing::warn!(server = %id, "no longer leading");
                    let _ = tx.send(State::Following { leader: None });
                    seen = None;
                }
                Err(StoreError::Conflict { .. }) => seen = None,
                Err(e) => tracing::debug!(error = %e, "take the leader key"),
            }
        }
        let leader = current.and_then(|kv| serde_json::from_slice::<Record>(&kv.value).ok());
        let _ = tx.send_if_modified(|s| {
            let next = State::Following {
                leader: leader.map(|r| r.holder),
            };
            let changed = *s != next;
            *s = next;
            changed
        });
        tokio::time::sleep(poll).await;
    }
}

fn record(id: &str, renewals: u64) -> Bytes {
    Bytes::from(
        serde_json::to_vec(&Record {
            holder: id.to_owned(),
            renewals,
        })
        .unwrap_or_default(),
    )
}

/// Renews until leadership is lost: the keys changed under us, or no renewal got through for
/// `ttl / 2`. `revision` is the term's epoch (both keys were written at it).
async fn lead(store: &Arc<dyn Store>, id: &str, ttl: Duration, epoch: Revision) {
    let mut revision = epoch;
    let mut renewed = Instant::now();
    let mut renewals = 0;
    loop {
        tokio::time::sleep(ttl / 4).await;
        if renewed.elapsed() >= ttl / 2 {
            return;
        }
        renewals += 1;
        let ops = vec![
            Op::Require {
                key: LEADER_KEY.into(),
                mod_revision: epoch,
            },
            Op::Update {
                key: BEAT_KEY.into(),
                value: record(id, renewals),
                mod_revision: revision,
            },
        ];
        // A renewal that answers after the deadline does not count.
        match tokio::time::timeout_at(renewed + ttl / 2, store.txn(ops)).await {
            Ok(Ok(r)) => {
                revision = r.revision;
                renewed = Instant::now();
            }
            Ok(Err(StoreError::Conflict { .. })) => return,
            Ok(Err(e)) => tracing::warn!(error = %e, "renew leadership"),
            Err(_) => return,
        }
    }
}

/// Runs `start`'s tasks (given the term's epoch) while this server leads and aborts them as
/// soon as it does not.
pub async fn while_leading<F>(mut state: watch::Receiver<State>, start: F)
where
    F: Fn(Revision) -> Vec<tokio::task::JoinHandle<()>>,
{
    loop {
        let epoch = match state.wait_for(|s| matches!(s, State::Leading { .. })).await {
            Ok(s) => match *s {
                State::Leading { since } => since,
                State::Following { .. } => continue,
            },
            Err(_) => return,
        };
        let tasks = start(epoch);
        let lost = state
            .wait_for(|s| !matches!(s, State::Leading { .. }))
            .await
            .is_err();
        for t in &tasks {
            t.abort();
        }
        if lost {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use async_trait::async_trait;
    use hive_store::{GetResponse, ListResponse, RedbStore, Result, TxnResponse, WatchStream};

    use super::*;

    /// A store that can be cut off from its server: every call fails while `cut`.
    struct Partitionable {
        inner: Arc<dyn Store>,
        cut: AtomicBool,
    }

    impl Partitionable {
        fn check(&self) -> Result<()> {
            if self.cut.load(Ordering::SeqCst) {
                return Err(StoreError::Unavailable("partitioned (test)".into()));
            }
            Ok(())
        }
    }

    #[async_trait]
    impl Store for Partitionable {
        async fn get(&self, key: &str) -> Result<GetResponse> {
            self.check()?;
            self.inner.get(key).await
        }
        async fn list(
            &self,
            prefix: &str,
            start_after: Option<&str>,
            limit: usize,
        ) -> Result<ListResponse> {
            self.check()?;
            self.inner.list(prefix, start_after, limit).await
        }
        async fn txn(&self, ops: Vec<Op>) -> Result<TxnResponse> {
            self.check()?;
            self.inner.txn(ops).await
        }
        async fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream> {
            self.check()?;
            self.inner.watch(prefix, after).await
        }
        async fn watch_synced(
            &self,
            prefix: &str,
            after: Revision,
        ) -> Result<hive_store::SyncedWatchStream> {
            self.check()?;
            self.inner.watch_synced(prefix, after).await
        }
        async fn compact(&self, revision: Revision) -> Result<()> {
            self.check()?;
            self.inner.compact(revision).await
        }
        async fn current_revision(&self) -> Result<Revision> {
            self.check()?;
            self.inner.current_revision().await
        }
        async fn compacted_revision(&self) -> Result<Revision> {
            self.check()?;
            self.inner.compacted_revision().await
        }
    }

    /// The times (since `t0`) at which `rx` became leading and stopped leading.
    fn record_changes(
        mut rx: watch::Receiver<State>,
        t0: Instant,
    ) -> tokio::task::JoinHandle<Vec<(bool, Duration)>> {
        tokio::spawn(async move {
            let mut out = Vec::new();
            let mut leading = false;
            while rx.changed().await.is_ok() {
                let now = matches!(*rx.borrow(), State::Leading { .. });
                if now != leading {
                    out.push((now, t0.elapsed()));
                    leading = now;
                }
            }
            out
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_leads_a_partitioned_leader_stops_before_another_takes_over() {
        let dir = tempfile::tempdir().unwrap();
        let redb: Arc<dyn Store> =
            Arc::new(RedbStore::open(dir.path().join("s.redb"), Default::default()).unwrap());
        let a = Arc::new(Partitionable {
            inner: redb.clone(),
            cut: AtomicBool::new(false),
        });
        let ttl = Duration::from_millis(600);
        let t0 = Instant::now();
        let (txa, rxa) = watch::channel(State::Following { leader: None });
        let (txb, rxb) = watch::channel(State::Following { leader: None });
        let ea = tokio::spawn(elect(a.clone(), "a".into(), ttl, txa));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let eb = tokio::spawn(elect(redb.clone(), "b".into(), ttl, txb));
        let (ha, hb) = (
            record_changes(rxa.clone(), t0),
            record_changes(rxb.clone(), t0),
        );
        // a leads; b follows it for as long as a renews.
        tokio::time::sleep(ttl * 4).await;
        assert!(matches!(*rxa.borrow(), State::Leading { .. }));
        assert_eq!(
            *rxb.borrow(),
            State::Following {
                leader: Some("a".into())
            }
        );
        // a is cut off from the store: it stops, then b takes over.
        a.cut.store(true, Ordering::SeqCst);
        let cut_at = t0.elapsed();
        tokio::time::sleep(ttl * 4).await;
        assert!(matches!(*rxb.borrow(), State::Leading { .. }));
        assert!(!matches!(*rxa.borrow(), State::Leading { .. }));
        ea.abort();
        eb.abort();
        let _ = ea.await;
        let _ = eb.await;
        let (ca, cb) = (ha.await.unwrap(), hb.await.unwrap());
        let a_stopped = ca.iter().find(|(l, _)| !l).map(|(_, t)| *t).unwrap();
        let b_started = cb.iter().find(|(l, _)| *l).map(|(_, t)| *t).unwrap();
        assert_eq!(ca.iter().filter(|(l, _)| *l).count(), 1, "{ca:?}");
        assert!(
            a_stopped < b_started,
            "a stopped at {a_stopped:?}, b took over at {b_started:?}"
        );
        assert!(
            a_stopped - cut_at <= ttl / 2 + ttl / 4,
            "{a_stopped:?} after the cut at {cut_at:?}"
        );
        assert!(
            b_started - cut_at <= ttl + ttl / 2,
            "failover took {:?}",
            b_started - cut_at
        );
    }

    #[tokio::test]
    async fn tasks_run_only_while_leading() {
        let (tx, rx) = watch::channel(State::Following { leader: None });
        let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let alive = Arc::new(AtomicBool::new(false));
        let (r, al) = (runs.clone(), alive.clone());
        let guard = tokio::spawn(while_leading(rx, move |_epoch| {
            r.fetch_add(1, Ordering::SeqCst);
            let al = al.clone();
            vec![tokio::spawn(async move {
                struct Flag(Arc<AtomicBool>);
                impl Drop for Flag {
                    fn drop(&mut self) {
                        self.0.store(false, Ordering::SeqCst);
                    }
                }
                al.store(true, Ordering::SeqCst);
                let _f = Flag(al);
                std::future::pending::<()>().await;
            })]
        }));
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 0);
        tx.send(State::Leading { since: 1 }).unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(alive.load(Ordering::SeqCst));
        tx.send(State::Following { leader: None }).unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(
            !alive.load(Ordering::SeqCst),
            "aborted when leadership went"
        );
        tx.send(State::Leading { since: 5 }).unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 2);
        drop(tx);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(guard.is_finished());
        assert!(!alive.load(Ordering::SeqCst));
    }
}
