//! The etcd backend when etcd fails: a three-member cluster losing its leader (SIGKILL) under
//! a steady write load, a member dead before the store connects, and etcd unreachable at start.
//! Real etcd processes on loopback (see `support`).

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use hive_store::{
    EtcdStore, EtcdStoreOptions, Event, Op, Revision, Store, StoreError, WatchStream,
};
use support::{EtcdCluster, free_ports};

const WRITERS: usize = 4;

fn put(key: &str) -> Op {
    Op::Put {
        key: key.to_owned(),
        value: Bytes::copy_from_slice(key.as_bytes()),
    }
}

/// Reads events until one at `last` (inclusive) arrived.
async fn events_until(watch: &mut WatchStream, last: Revision) -> Vec<Event> {
    let mut events: Vec<Event> = Vec::new();
    while events.last().is_none_or(|e| e.revision() < last) {
        match tokio::time::timeout(Duration::from_secs(30), watch.next()).await {
            Ok(Some(Ok(event))) => events.push(event),
            Ok(Some(Err(e))) => panic!("watch failed after {} events: {e}", events.len()),
            Ok(None) => panic!("watch ended after {} events", events.len()),
            Err(_) => panic!(
                "no event within 30s; have {} events, up to {:?}, waiting for {last}",
                events.len(),
                events.last().map(Event::revision)
            ),
        }
    }
    events
}

/// What one writer saw: acknowledged writes (key, revision, when) and writes whose outcome
/// the store reported as unknown.
#[derive(Default)]
struct Outcomes {
    acked: Vec<(String, Revision, Instant)>,
    unknown: Vec<String>,
}

async fn write_until_stopped(
    store: Arc<EtcdStore>,
    writer: usize,
    stop: Arc<AtomicBool>,
    acks: Arc<AtomicUsize>,
) -> Outcomes {
    let mut outcomes = Outcomes::default();
    for n in 0u64.. {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let key = format!("/load/w{writer}/{n:06}");
        match store.txn(vec![put(&key)]).await {
            Ok(response) => {
                acks.fetch_add(1, Ordering::Relaxed);
                outcomes
                    .acked
                    .push((key, response.revision, Instant::now()))
            }
            Err(StoreError::Unavailable(_)) => outcomes.unknown.push(key),
            Err(other) => panic!("writer {writer}: {key}: {other}"),
        }
    }
    outcomes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_loses_no_acknowledged_write_and_applies_none_twice() {
    let mut etcd = EtcdCluster::start(3);
    let leader = etcd.wait_leader(Duration::from_secs(10));
    // The leader first, so that the kill hits the member the store (and the watch) is on.
    let mut options = etcd.store_options();
    options.endpoints.rotate_left(leader);
    let store = Arc::new(EtcdStore::connect(options).await.expect("connect"));
    assert_eq!(store.current_endpoint(), etcd.members[leader].url());

    let base = store.current_revision().await.expect("revision");
    let mut watch = store.watch("/load/", base).await.expect("watch");
    let stop = Arc::new(AtomicBool::new(false));
    let acks = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            tokio::spawn(write_until_stopped(
                Arc::clone(&store),
                w,
                Arc::clone(&stop),
                Arc::clone(&acks),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let killed_at = Instant::now();
    etcd.kill(leader);
    // Writes in flight on the killed member may wait out the request timeout (5 s) before
    // the store moves on: load until writes flow again (bounded), then a little more.
    let at_kill = acks.load(Ordering::Relaxed);
    let waited = Instant::now();
    while acks.load(Ordering::Relaxed) < at_kill + 100 && waited.elapsed() < Duration::from_secs(20)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let mut acked = Vec::new();
    let mut unknown = Vec::new();
    for writer in writers {
        let outcomes = writer.await.expect("writer");
        acked.extend(outcomes.acked);
        unknown.extend(outcomes.unknown);
    }
    let stopped = Instant::now();
    let new_leader = etcd.wait_leader(Duration::from_secs(10));
    assert_ne!(new_leader, leader);
    assert_ne!(store.current_endpoint(), etcd.members[leader].url());

    // Throughput and the stall around the kill.
    acked.sort_by_key(|(_, revision, _)| *revision);
    let before: Vec<_> = acked.iter().filter(|a| a.2 < killed_at).collect();
    let after: Vec<_> = acked.iter().filter(|a| a.2 >= killed_at).collect();
    // The longest time without any acknowledgement: the failover, seen by the writers.
    let mut times: Vec<Instant> = acked.iter().map(|a| a.2).collect();
    times.sort();
    let (stall, resumed) = times
        .windows(2)
        .map(|w| (w[1] - w[0], w[1]))
        .max()
        .expect("acknowledged writes");
    let before_rate = before.len() as f64 / (killed_at - started).as_secs_f64();
    let after_rate =
        acked.iter().filter(|a| a.2 >= resumed).count() as f64 / (stopped - resumed).as_secs_f64();
    println!(
        "etcd failover: {} writes acknowledged before the kill ({before_rate:.0}/s), {} after \
         ({after_rate:.0}/s once resumed); no acknowledgement for {stall:?} around the kill; \
         {} writes with an unknown outcome",
        before.len(),
        after.len(),
        unknown.len()
    );
    assert!(
        after.len() >= 20,
        "the store must keep accepting writes after failover, only {} were",
        after.len()
    );

    // Every acknowledged write is there, at the revision it was acknowledged with.
    let final_revision = store.current_revision().await.expect("revision");
    let listed = store.list("/load/", None, 0).await.expect("list");
    let present: BTreeMap<&str, (Revision, &Bytes)> = listed
        .kvs
        .iter()
        .map(|kv| (kv.key.as_str(), (kv.mod_revision, &kv.value)))
        .collect();
    for (key, revision, _) in &acked {
        let (found, value) = present
            .get(key.as_str())
            .unwrap_or_else(|| panic!("acknowledged write {key} at {revision} is missing"));
        assert_eq!(
            (*found, value.as_ref()),
            (*revision, key.as_bytes()),
            "{key}"
        );
    }
    // Nothing is there that was never sent.
    let sent: BTreeSet<&str> = acked
        .iter()
        .map(|a| a.0.as_str())
        .chain(unknown.iter().map(String::as_str))
        .collect();
    for key in present.keys() {
        assert!(sent.contains(key), "{key} was written but never sent");
    }

    // The watch opened before the load, on the killed member, resumed elsewhere: one event
    // per revision from the first write to the last, no gap, no repeat, so nothing was
    // applied twice (each write is a txn of its own on a key of its own).
    let events = events_until(&mut watch, final_revision).await;
    let revisions: Vec<Revision> = events.iter().map(Event::revision).collect();
    let expected: Vec<Revision> = (base + 1..=final_revision).collect();
    assert_eq!(revisions, expected, "gap or repeat in the resumed watch");
    let mut keys = BTreeSet::new();
    for event in &events {
        assert!(
            keys.insert(event.kv.key.as_str()),
            "{} was applied twice",
            event.kv.key
        );
    }
    assert_eq!(
        keys,
        present.keys().copied().collect(),
        "the events and the listing disagree"
    );

    // A watch opened now from the middle of that history, on the new leader, gives exactly
    // the same tail.
    let middle = before.last().map(|a| a.1).expect("writes before the kill");
    let mut resumed = store.watch("/load/", middle).await.expect("watch again");
    let tail = events_until(&mut resumed, final_revision).await;
    let expected_tail: Vec<&Event> = events.iter().filter(|e| e.revision() > middle).collect();
    assert_eq!(
        tail.iter().collect::<Vec<_>>(),
        expected_tail,
        "a watch resumed from {middle}"
    );

    // And the store writes on.
    store
        .txn(vec![put("/load/after")])
        .await
        .expect("write after failover");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_skips_a_dead_member() {
    let mut etcd = EtcdCluster::start(3);
    etcd.kill(0);
    let store = EtcdStore::connect(etcd.store_options())
        .await
        .expect("connect with one member of three dead");
    assert_ne!(store.current_endpoint(), etcd.members[0].url());
    store.txn(vec![put("/skip/a")]).await.expect("write");
    assert!(store.get("/skip/a").await.expect("get").kv.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_etcd_fails_clearly_after_bounded_retries() {
    let ports = free_ports(2);
    let endpoints: Vec<String> = ports
        .iter()
        .map(|p| format!("http://127.0.0.1:{p}"))
        .collect();
    let limit = Duration::from_secs(2);
    let options = EtcdStoreOptions {
        endpoints: endpoints.clone(),
        connect_timeout: limit,
        ..EtcdStoreOptions::default()
    };
    let started = Instant::now();
    let error = EtcdStore::connect(options)
        .await
        .expect_err("nothing listens on these ports");
    let took = started.elapsed();
    let StoreError::Unavailable(message) = &error else {
        panic!("expected Unavailable, got {error:?}");
    };
    for endpoint in &endpoints {
        assert!(message.contains(endpoint.as_str()), "{message}");
    }
    assert!(message.contains("refused"), "{message}");
    let rounds: u32 = message
        .split(" rounds")
        .next()
        .and_then(|head| head.rsplit('(').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no round count in {message}"));
    assert!(rounds >= 3, "retried only {rounds} times: {message}");
    assert!(
        took >= limit - Duration::from_millis(500) && took < limit + Duration::from_secs(3),
        "gave up after {took:?} for a limit of {limit:?}"
    );
    println!("unreachable etcd: {error} (after {took:?})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_waits_for_an_etcd_that_starts_late() {
    let ports = free_ports(3);
    let options = EtcdStoreOptions {
        endpoints: vec![format!("http://127.0.0.1:{}", ports[0])],
        connect_timeout: Duration::from_secs(30),
        ..EtcdStoreOptions::default()
    };
    let connecting = tokio::spawn(EtcdStore::connect(options));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !connecting.is_finished(),
        "connect gave up or succeeded early"
    );
    let _etcd = EtcdCluster::start_on([ports[0], ports[1], ports[2]]);
    let store = tokio::time::timeout(Duration::from_secs(20), connecting)
        .await
        .expect("connect did not notice etcd")
        .expect("connect task")
        .expect("connect");
    store.txn(vec![put("/late/a")]).await.expect("write");
}
