//! The conformance suite every [`crate::Store`] backend must pass unchanged.
//!
//! Written against the trait only, so the redb and etcd backends run the very same cases. A
//! backend's test calls [`run_all`] with a factory of fresh stores; each case gets its own
//! store and is the only writer of it (cases check that revisions are consecutive), and keeps
//! its keys under `/conformance/<case>/`. Cases panic with the case's name on failure.
//!
//! Timeouts here are generous bounds meant to turn a hang into a failure, not measurements.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;

use crate::{
    ConflictKind, Event, EventKind, MAX_KEY_BYTES, MAX_TXN_OPS, MAX_VALUE_BYTES, Op, Revision,
    Store, StoreError, SyncedWatchStream, WatchItem, WatchStream,
};

/// How long a case waits for an event that must come.
const EVENT_TIMEOUT: Duration = Duration::from_secs(20);

/// Runs every case, each on a fresh store from `new_store`.
pub async fn run_all<S, F, Fut>(new_store: F)
where
    S: Store,
    F: Fn() -> Fut,
    Fut: Future<Output = S>,
{
    macro_rules! case {
        ($name:ident) => {
            $name(Arc::new(new_store().await)).await
        };
    }
    case!(get_and_list);
    case!(list_pagination);
    case!(prefix_boundaries);
    case!(create_conflict);
    case!(update_if_revision);
    case!(delete_if_revision);
    case!(require_guards_a_write);
    case!(put_unconditional);
    case!(delete_prefix);
    case!(atomicity);
    case!(one_revision_per_txn);
    case!(monotonic_revisions);
    case!(watch_from_zero);
    case!(watch_from_middle);
    case!(watch_from_future);
    case!(watch_prev_values);
    case!(watch_order_with_concurrent_writers);
    case!(watch_synced_marks_the_end_of_the_replay);
    case!(watch_synced_with_nothing_to_replay);
    case!(watch_synced_from_compacted_history);
    case!(slow_watcher_gets_everything);
    case!(compaction);
    case!(compaction_overtaking_a_watcher);
    case!(validation_limits);
}

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

fn create(key: &str, value: &str) -> Op {
    Op::Create {
        key: key.into(),
        value: b(value),
    }
}

fn put(key: &str, value: &str) -> Op {
    Op::Put {
        key: key.into(),
        value: b(value),
    }
}

async fn commit<S: Store>(store: &S, case: &str, ops: Vec<Op>) -> Revision {
    match store.txn(ops.clone()).await {
        Ok(response) => response.revision,
        Err(err) => panic!("{case}: txn {ops:?} failed: {err}"),
    }
}

async fn current<S: Store>(store: &S, case: &str) -> Revision {
    store
        .current_revision()
        .await
        .unwrap_or_else(|e| panic!("{case}: current_revision failed: {e}"))
}

async fn open_watch<S: Store>(store: &S, case: &str, prefix: &str, after: Revision) -> WatchStream {
    store
        .watch(prefix, after)
        .await
        .unwrap_or_else(|e| panic!("{case}: watch {prefix} after {after} failed: {e}"))
}

async fn next_event(stream: &mut WatchStream, case: &str) -> Event {
    match tokio::time::timeout(EVENT_TIMEOUT, stream.next()).await {
        Ok(Some(Ok(event))) => event,
        Ok(Some(Err(err))) => panic!("{case}: watch failed: {err}"),
        Ok(None) => panic!("{case}: watch ended"),
        Err(_) => panic!("{case}: no event within {EVENT_TIMEOUT:?}"),
    }
}

async fn open_synced<S: Store>(
    store: &S,
    case: &str,
    prefix: &str,
    after: Revision,
) -> SyncedWatchStream {
    store
        .watch_synced(prefix, after)
        .await
        .unwrap_or_else(|e| panic!("{case}: watch_synced {prefix} after {after} failed: {e}"))
}

/// The next item of a synced watch: `Ok(event)`, or `Err(revision)` for the mark.
async fn next_item(stream: &mut SyncedWatchStream, case: &str) -> Result<Event, Revision> {
    match tokio::time::timeout(EVENT_TIMEOUT, stream.next()).await {
        Ok(Some(Ok(WatchItem::Event(event)))) => Ok(event),
        Ok(Some(Ok(WatchItem::Synced(revision)))) => Err(revision),
        Ok(Some(Err(err))) => panic!("{case}: watch failed: {err}"),
        Ok(None) => panic!("{case}: watch ended"),
        Err(_) => panic!("{case}: nothing within {EVENT_TIMEOUT:?}"),
    }
}

/// Asserts that nothing arrives on the stream for a short while.
async fn assert_quiet(stream: &mut WatchStream, case: &str) {
    if let Ok(item) = tokio::time::timeout(Duration::from_millis(300), stream.next()).await {
        panic!("{case}: expected no event, got {item:?}");
    }
}

fn assert_conflict<T: std::fmt::Debug>(
    result: Result<T, StoreError>,
    case: &str,
    key: &str,
    kind: ConflictKind,
) {
    match result {
        Err(StoreError::Conflict { key: k, kind: got }) => {
            assert_eq!((k.as_str(), &got), (key, &kind), "{case}: wrong conflict");
        }
        other => panic!("{case}: expected conflict {kind:?} on {key}, got {other:?}"),
    }
}

/// Point reads and full listings see what was written, with its revisions.
pub async fn get_and_list<S: Store>(store: Arc<S>) {
    let case = "get_and_list";
    let missing = store
        .get("/conformance/get/missing")
        .await
        .expect("get missing");
    assert_eq!(missing.kv, None, "{case}: missing key has a value");

    let rev = commit(&*store, case, vec![create("/conformance/get/a", "alpha")]).await;
    let got = store.get("/conformance/get/a").await.expect("get a");
    let kv = got
        .kv
        .unwrap_or_else(|| panic!("{case}: written key is missing"));
    assert_eq!(kv.key, "/conformance/get/a", "{case}");
    assert_eq!(kv.value, b("alpha"), "{case}");
    assert_eq!((kv.create_revision, kv.mod_revision), (rev, rev), "{case}");
    assert!(
        got.revision >= rev,
        "{case}: read revision {} before the write {rev}",
        got.revision
    );
    assert!(
        current(&*store, case).await >= rev,
        "{case}: current revision before the write"
    );

    let listed = store
        .list("/conformance/get/", None, 0)
        .await
        .expect("list");
    assert_eq!(listed.kvs, vec![kv], "{case}: list");
    assert!(!listed.more, "{case}: more on a complete list");
    assert!(
        listed.revision >= rev,
        "{case}: list revision before the write"
    );
}

/// Paging with `start_after` and `limit` walks every key exactly once, in order.
pub async fn list_pagination<S: Store>(store: Arc<S>) {
    let case = "list_pagination";
    let prefix = "/conformance/page/";
    let keys: Vec<String> = (0..10).map(|i| format!("{prefix}k{i:02}")).collect();
    let ops = keys.iter().map(|k| create(k, k)).collect();
    let rev = commit(&*store, case, ops).await;

    let all = store.list(prefix, None, 0).await.expect("list all");
    let listed: Vec<&str> = all.kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(
        listed,
        keys.iter().map(String::as_str).collect::<Vec<_>>(),
        "{case}: full list"
    );
    assert!(!all.more, "{case}: more on a full list");
    assert!(all.revision >= rev, "{case}");

    let first = store.list(prefix, None, 3).await.expect("first page");
    let first_keys: Vec<&str> = first.kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(
        first_keys,
        vec![&keys[0], &keys[1], &keys[2]],
        "{case}: first page"
    );
    assert!(first.more, "{case}: first page must say more");

    let mut walked = Vec::new();
    let mut after: Option<String> = None;
    let mut pages = 0;
    loop {
        let page = store.list(prefix, after.as_deref(), 3).await.expect("page");
        pages += 1;
        assert!(page.kvs.len() <= 3, "{case}: page longer than its limit");
        walked.extend(page.kvs.iter().map(|kv| kv.key.clone()));
        if !page.more {
            break;
        }
        after = page.kvs.last().map(|kv| kv.key.clone());
        assert!(pages < 10, "{case}: pagination does not end");
    }
    assert_eq!(walked, keys, "{case}: paged walk");
    assert_eq!(pages, 4, "{case}: 10 keys by 3 make 4 pages");

    // A limit that exactly fits the rest: no more.
    let tail = store.list(prefix, Some(&keys[6]), 3).await.expect("tail");
    assert_eq!(tail.kvs.len(), 3, "{case}: tail page");
    assert!(!tail.more, "{case}: more after the last key");

    // `start_after` need not be a key, nor under the prefix.
    let between = store
        .list(prefix, Some(&format!("{prefix}k035")), 2)
        .await
        .expect("between");
    let between: Vec<&str> = between.kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(
        between,
        vec![&keys[4], &keys[5]],
        "{case}: start between keys"
    );
    let before = store
        .list(prefix, Some("/conformance/"), 1)
        .await
        .expect("before");
    assert_eq!(
        before.kvs[0].key, keys[0],
        "{case}: start before the prefix"
    );
    let beyond = store.list(prefix, Some(&keys[9]), 0).await.expect("beyond");
    assert!(
        beyond.kvs.is_empty() && !beyond.more,
        "{case}: nothing after the last key"
    );
}

/// A prefix matches by bytes: `/a/` does not list `/ab` nor `/a`.
pub async fn prefix_boundaries<S: Store>(store: Arc<S>) {
    let case = "prefix_boundaries";
    let p = "/conformance/bound";
    let base = current(&*store, case).await;
    commit(
        &*store,
        case,
        vec![
            create(&format!("{p}/a"), "1"),
            create(&format!("{p}/a/"), "2"),
            create(&format!("{p}/a/x"), "3"),
            create(&format!("{p}/ab"), "4"),
            create(&format!("{p}/b/x"), "5"),
        ],
    )
    .await;
    let prefix = format!("{p}/a/");
    let listed = store.list(&prefix, None, 0).await.expect("list");
    let keys: Vec<&str> = listed.kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(
        keys,
        vec![format!("{p}/a/"), format!("{p}/a/x")],
        "{case}: list {prefix}"
    );

    let mut watch = open_watch(&*store, case, &prefix, base).await;
    let first = next_event(&mut watch, case).await;
    let second = next_event(&mut watch, case).await;
    assert_eq!(
        (first.kv.key.as_str(), second.kv.key.as_str()),
        (keys[0], keys[1]),
        "{case}"
    );
    commit(&*store, case, vec![put(&format!("{p}/ab"), "x")]).await;
    commit(&*store, case, vec![put(&format!("{p}/a/y"), "y")]).await;
    let live = next_event(&mut watch, case).await;
    assert_eq!(
        live.kv.key,
        format!("{p}/a/y"),
        "{case}: watch leaked a key outside the prefix"
    );

    commit(
        &*store,
        case,
        vec![Op::DeletePrefix {
            prefix: prefix.clone(),
        }],
    )
    .await;
    assert!(
        store
            .list(&prefix, None, 0)
            .await
            .expect("list")
            .kvs
            .is_empty(),
        "{case}"
    );
    for survivor in [format!("{p}/a"), format!("{p}/ab"), format!("{p}/b/x")] {
        let got = store.get(&survivor).await.expect("get");
        assert!(
            got.kv.is_some(),
            "{case}: delete of prefix {prefix} removed {survivor}"
        );
    }
}

/// `Create` of an existing key conflicts and writes nothing.
pub async fn create_conflict<S: Store>(store: Arc<S>) {
    let case = "create_conflict";
    let key = "/conformance/create/k";
    let rev = commit(&*store, case, vec![create(key, "one")]).await;
    assert_conflict(
        store.txn(vec![create(key, "two")]).await,
        case,
        key,
        ConflictKind::Exists { mod_revision: rev },
    );
    assert_eq!(
        current(&*store, case).await,
        rev,
        "{case}: a conflict consumed a revision"
    );
    let kv = store.get(key).await.expect("get").kv.expect("key");
    assert_eq!((kv.value, kv.mod_revision), (b("one"), rev), "{case}");
}

/// `Update` succeeds only at the key's exact revision and keeps its create revision.
pub async fn update_if_revision<S: Store>(store: Arc<S>) {
    let case = "update_if_revision";
    let key = "/conformance/update/k";
    let update = |value: &str, mod_revision| Op::Update {
        key: key.into(),
        value: b(value),
        mod_revision,
    };
    assert_conflict(
        store.txn(vec![update("x", 1)]).await,
        case,
        key,
        ConflictKind::Missing,
    );

    let r1 = commit(&*store, case, vec![create(key, "v1")]).await;
    assert_conflict(
        store.txn(vec![update("x", r1 + 100)]).await,
        case,
        key,
        ConflictKind::RevisionMismatch {
            expected: r1 + 100,
            actual: r1,
        },
    );
    let r2 = commit(&*store, case, vec![update("v2", r1)]).await;
    assert_eq!(r2, r1 + 1, "{case}: revisions not consecutive");
    let kv = store.get(key).await.expect("get").kv.expect("key");
    assert_eq!(
        (kv.value, kv.create_revision, kv.mod_revision),
        (b("v2"), r1, r2),
        "{case}"
    );
    // The revision it was read at is now stale.
    assert_conflict(
        store.txn(vec![update("v3", r1)]).await,
        case,
        key,
        ConflictKind::RevisionMismatch {
            expected: r1,
            actual: r2,
        },
    );
    assert_eq!(
        current(&*store, case).await,
        r2,
        "{case}: a conflict consumed a revision"
    );
}

/// `Delete` with a revision succeeds only at that revision; without, only if present.
pub async fn delete_if_revision<S: Store>(store: Arc<S>) {
    let case = "delete_if_revision";
    let key = "/conformance/delete/k";
    let r1 = commit(&*store, case, vec![create(key, "v")]).await;
    assert_conflict(
        store
            .txn(vec![Op::Delete {
                key: key.into(),
                mod_revision: Some(r1 + 7),
            }])
            .await,
        case,
        key,
        ConflictKind::RevisionMismatch {
            expected: r1 + 7,
            actual: r1,
        },
    );
    assert!(
        store.get(key).await.expect("get").kv.is_some(),
        "{case}: failed delete deleted"
    );
    let r2 = commit(
        &*store,
        case,
        vec![Op::Delete {
            key: key.into(),
            mod_revision: Some(r1),
        }],
    )
    .await;
    assert_eq!(r2, r1 + 1, "{case}");
    assert_eq!(
        store.get(key).await.expect("get").kv,
        None,
        "{case}: still there"
    );
    assert_conflict(
        store
            .txn(vec![Op::Delete {
                key: key.into(),
                mod_revision: None,
            }])
            .await,
        case,
        key,
        ConflictKind::Missing,
    );
    let other = "/conformance/delete/other";
    commit(&*store, case, vec![create(other, "v")]).await;
    commit(
        &*store,
        case,
        vec![Op::Delete {
            key: other.into(),
            mod_revision: None,
        }],
    )
    .await;
    assert_eq!(
        store.get(other).await.expect("get").kv,
        None,
        "{case}: unconditional delete"
    );
}

/// `Require` writes nothing, leaves no event, and fails the whole txn unless its key is at
/// exactly the given revision.
pub async fn require_guards_a_write<S: Store>(store: Arc<S>) {
    let case = "require_guards_a_write";
    let guard = "/conformance/require/tenant";
    let child = "/conformance/require/tenant-objects/a";
    let r1 = commit(&*store, case, vec![create(guard, "v")]).await;
    let mut watch = open_watch(&*store, case, "/conformance/require/", r1).await;
    let require = |mod_revision| Op::Require {
        key: guard.into(),
        mod_revision,
    };
    let r2 = commit(&*store, case, vec![require(r1), create(child, "x")]).await;
    assert_eq!(r2, r1 + 1, "{case}");
    let got = store.get(guard).await.expect("get").kv.expect("guard kept");
    assert_eq!(
        got.mod_revision, r1,
        "{case}: require must not write its key"
    );
    let ev = next_event(&mut watch, case).await;
    assert_eq!((ev.kv.key.as_str(), ev.revision()), (child, r2), "{case}");
    assert_quiet(&mut watch, case).await;

    assert_conflict(
        store
            .txn(vec![
                require(r1 + 5),
                create("/conformance/require/tenant-objects/b", "x"),
            ])
            .await,
        case,
        guard,
        ConflictKind::RevisionMismatch {
            expected: r1 + 5,
            actual: r1,
        },
    );
    commit(
        &*store,
        case,
        vec![Op::Delete {
            key: guard.into(),
            mod_revision: None,
        }],
    )
    .await;
    let before = current(&*store, case).await;
    assert_conflict(
        store
            .txn(vec![
                require(r1),
                create("/conformance/require/tenant-objects/c", "x"),
            ])
            .await,
        case,
        guard,
        ConflictKind::Missing,
    );
    assert_eq!(
        current(&*store, case).await,
        before,
        "{case}: failed txn consumed a revision"
    );
    for k in [
        "/conformance/require/tenant-objects/b",
        "/conformance/require/tenant-objects/c",
    ] {
        assert!(
            store.get(k).await.expect("get").kv.is_none(),
            "{case}: {k} written by a failed txn"
        );
    }
}

/// `Put` creates or replaces whatever is there.
pub async fn put_unconditional<S: Store>(store: Arc<S>) {
    let case = "put_unconditional";
    let key = "/conformance/put/k";
    let r1 = commit(&*store, case, vec![put(key, "v1")]).await;
    let r2 = commit(&*store, case, vec![put(key, "v2")]).await;
    let kv = store.get(key).await.expect("get").kv.expect("key");
    assert_eq!(
        (kv.value, kv.create_revision, kv.mod_revision),
        (b("v2"), r1, r2),
        "{case}"
    );
}

/// `DeletePrefix` deletes every key under it at one revision, one event each with its prev
/// value; deleting nothing is fine, emits nothing, and the next write follows it directly.
pub async fn delete_prefix<S: Store>(store: Arc<S>) {
    let case = "delete_prefix";
    let prefix = "/conformance/dp/";
    let keys: Vec<String> = (0..5).map(|i| format!("{prefix}{i}")).collect();
    commit(
        &*store,
        case,
        keys.iter().map(|k| create(k, &format!("v{k}"))).collect(),
    )
    .await;
    commit(&*store, case, vec![create("/conformance/dpx", "outside")]).await;
    let before = current(&*store, case).await;
    let rev = commit(
        &*store,
        case,
        vec![Op::DeletePrefix {
            prefix: prefix.into(),
        }],
    )
    .await;
    assert_eq!(rev, before + 1, "{case}");
    assert!(
        store
            .list(prefix, None, 0)
            .await
            .expect("list")
            .kvs
            .is_empty(),
        "{case}: left keys"
    );
    assert!(
        store
            .get("/conformance/dpx")
            .await
            .expect("get")
            .kv
            .is_some(),
        "{case}: overreached"
    );

    let mut watch = open_watch(&*store, case, prefix, before).await;
    for key in &keys {
        let event = next_event(&mut watch, case).await;
        assert_eq!(event.kind, EventKind::Delete, "{case}");
        assert_eq!(
            (event.kv.key.as_str(), event.revision()),
            (key.as_str(), rev),
            "{case}"
        );
        let prev = event
            .prev
            .unwrap_or_else(|| panic!("{case}: delete of {key} without prev"));
        assert_eq!(prev.value, b(&format!("v{key}")), "{case}: prev value");
    }
    assert_quiet(&mut watch, case).await;

    // A txn that changes nothing takes no revision (a watch on every key sees every revision,
    // which the watch cache relies on): it answers the store's revision, and the next write
    // comes right after that. Likewise a txn of `Require`s alone.
    let empty = commit(
        &*store,
        case,
        vec![Op::DeletePrefix {
            prefix: prefix.into(),
        }],
    )
    .await;
    assert_eq!(empty, rev, "{case}: deleting nothing took a revision");
    let dpx = store
        .get("/conformance/dpx")
        .await
        .expect("get")
        .kv
        .expect("dpx");
    let required = commit(
        &*store,
        case,
        vec![Op::Require {
            key: "/conformance/dpx".into(),
            mod_revision: dpx.mod_revision,
        }],
    )
    .await;
    assert_eq!(required, rev, "{case}: a Require alone took a revision");
    let next = commit(&*store, case, vec![put("/conformance/dpx", "after")]).await;
    assert_eq!(next, rev + 1, "{case}: the write after deleting nothing");
    assert_quiet(&mut watch, case).await;
}

/// A txn whose third op fails writes nothing, emits nothing and takes no revision.
pub async fn atomicity<S: Store>(store: Arc<S>) {
    let case = "atomicity";
    let p = "/conformance/atomic/";
    let existing = format!("{p}exists");
    let r0 = commit(&*store, case, vec![create(&existing, "old")]).await;
    let mut watch = open_watch(&*store, case, p, r0).await;
    let result = store
        .txn(vec![
            create(&format!("{p}a"), "a"),
            put(&format!("{p}b"), "b"),
            create(&existing, "new"),
            Op::Delete {
                key: format!("{p}missing"),
                mod_revision: None,
            },
        ])
        .await;
    assert_conflict(
        result,
        case,
        &existing,
        ConflictKind::Exists { mod_revision: r0 },
    );
    assert_eq!(
        current(&*store, case).await,
        r0,
        "{case}: failed txn took a revision"
    );
    for key in [format!("{p}a"), format!("{p}b")] {
        assert_eq!(
            store.get(&key).await.expect("get").kv,
            None,
            "{case}: {key} written"
        );
    }
    let kv = store
        .get(&existing)
        .await
        .expect("get")
        .kv
        .expect("existing");
    assert_eq!(kv.value, b("old"), "{case}: existing key overwritten");

    let r1 = commit(&*store, case, vec![put(&format!("{p}c"), "c")]).await;
    assert_eq!(r1, r0 + 1, "{case}: the failed txn left a gap");
    let event = next_event(&mut watch, case).await;
    assert_eq!(
        (event.kv.key.clone(), event.revision()),
        (format!("{p}c"), r1),
        "{case}: events of a failed txn"
    );
}

/// All writes of a txn share its one revision; their events come in key order.
pub async fn one_revision_per_txn<S: Store>(store: Arc<S>) {
    let case = "one_revision_per_txn";
    let p = "/conformance/onerev/";
    commit(&*store, case, vec![create(&format!("{p}old"), "x")]).await;
    let before = current(&*store, case).await;
    let rev = commit(
        &*store,
        case,
        vec![
            create(&format!("{p}c"), "c"),
            put(&format!("{p}a"), "a"),
            Op::Delete {
                key: format!("{p}old"),
                mod_revision: None,
            },
            create(&format!("{p}b"), "b"),
        ],
    )
    .await;
    assert_eq!(rev, before + 1, "{case}");
    let listed = store.list(p, None, 0).await.expect("list");
    assert_eq!(listed.kvs.len(), 3, "{case}");
    for kv in &listed.kvs {
        assert_eq!(
            kv.mod_revision, rev,
            "{case}: {} has another revision",
            kv.key
        );
    }
    let mut watch = open_watch(&*store, case, p, before).await;
    let mut seen = Vec::new();
    for _ in 0..4 {
        let event = next_event(&mut watch, case).await;
        assert_eq!(event.revision(), rev, "{case}");
        seen.push((event.kv.key.clone(), event.kind));
    }
    let expected = vec![
        (format!("{p}a"), EventKind::Put),
        (format!("{p}b"), EventKind::Put),
        (format!("{p}c"), EventKind::Put),
        (format!("{p}old"), EventKind::Delete),
    ];
    assert_eq!(
        seen, expected,
        "{case}: events of one revision not in key order"
    );
}

/// Concurrent txns get distinct revisions, increasing for each caller, with no gaps.
pub async fn monotonic_revisions<S: Store>(store: Arc<S>) {
    let case = "monotonic_revisions";
    let base = current(&*store, case).await;
    let mut tasks = Vec::new();
    for t in 0..8 {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            let mut revisions = Vec::new();
            for i in 0..20 {
                let key = format!("/conformance/mono/{t}/{i}");
                revisions.push(commit(&*store, case, vec![create(&key, "v")]).await);
            }
            revisions
        }));
    }
    let mut all = BTreeSet::new();
    for task in tasks {
        let revisions = task.await.expect("writer task");
        assert!(
            revisions.windows(2).all(|w| w[0] < w[1]),
            "{case}: not increasing: {revisions:?}"
        );
        for r in revisions {
            assert!(all.insert(r), "{case}: revision {r} given twice");
        }
    }
    let expected: BTreeSet<Revision> = (base + 1..=base + 160).collect();
    assert_eq!(
        all, expected,
        "{case}: revisions are not the consecutive range after {base}"
    );
    assert_eq!(current(&*store, case).await, base + 160, "{case}");
}

/// A watch from 0 replays all history, then goes live.
pub async fn watch_from_zero<S: Store>(store: Arc<S>) {
    let case = "watch_from_zero";
    let p = "/conformance/wzero/";
    let r1 = commit(&*store, case, vec![put(&format!("{p}a"), "1")]).await;
    let r2 = commit(&*store, case, vec![put(&format!("{p}b"), "2")]).await;
    let r3 = commit(
        &*store,
        case,
        vec![Op::Delete {
            key: format!("{p}a"),
            mod_revision: None,
        }],
    )
    .await;
    let mut watch = open_watch(&*store, case, p, 0).await;
    let expected = [
        (r1, "a", EventKind::Put),
        (r2, "b", EventKind::Put),
        (r3, "a", EventKind::Delete),
    ];
    for (rev, key, kind) in expected {
        let event = next_event(&mut watch, case).await;
        assert_eq!(
            (event.revision(), event.kv.key.clone(), event.kind),
            (rev, format!("{p}{key}"), kind),
            "{case}"
        );
    }
    let r4 = commit(&*store, case, vec![put(&format!("{p}c"), "3")]).await;
    let live = next_event(&mut watch, case).await;
    assert_eq!(
        (live.revision(), live.kv.value),
        (r4, b("3")),
        "{case}: live event"
    );
}

/// A watch from a past revision starts right after it.
pub async fn watch_from_middle<S: Store>(store: Arc<S>) {
    let case = "watch_from_middle";
    let p = "/conformance/wmid/";
    let mut revisions = Vec::new();
    for i in 0..5 {
        revisions.push(commit(&*store, case, vec![put(&format!("{p}k"), &i.to_string())]).await);
    }
    let mut watch = open_watch(&*store, case, p, revisions[1]).await;
    for (i, rev) in revisions.iter().enumerate().skip(2) {
        let event = next_event(&mut watch, case).await;
        assert_eq!(
            (event.revision(), event.kv.value.clone()),
            (*rev, b(&i.to_string())),
            "{case}"
        );
    }
    let next = commit(&*store, case, vec![put(&format!("{p}k"), "live")]).await;
    assert_eq!(
        next_event(&mut watch, case).await.revision(),
        next,
        "{case}: live after history"
    );
}

/// A watch from a revision not yet reached waits for it and skips what came before.
pub async fn watch_from_future<S: Store>(store: Arc<S>) {
    let case = "watch_from_future";
    let p = "/conformance/wfuture/";
    let now = current(&*store, case).await;
    let mut watch = open_watch(&*store, case, p, now + 3).await;
    assert_quiet(&mut watch, case).await;
    let mut revisions = Vec::new();
    for i in 0..5 {
        revisions.push(commit(&*store, case, vec![put(&format!("{p}{i}"), "v")]).await);
    }
    assert_eq!(revisions[0], now + 1, "{case}");
    for rev in &revisions[3..] {
        assert_eq!(
            next_event(&mut watch, case).await.revision(),
            *rev,
            "{case}"
        );
    }
    assert_quiet(&mut watch, case).await;
}

/// Put and delete events carry the value they replaced; a delete event has no value and the
/// deleting revision.
pub async fn watch_prev_values<S: Store>(store: Arc<S>) {
    let case = "watch_prev_values";
    let key = "/conformance/prev/k";
    let base = current(&*store, case).await;
    let r1 = commit(&*store, case, vec![create(key, "v1")]).await;
    let r2 = commit(&*store, case, vec![put(key, "v2")]).await;
    let r3 = commit(
        &*store,
        case,
        vec![Op::Delete {
            key: key.into(),
            mod_revision: Some(r2),
        }],
    )
    .await;
    let mut history = open_watch(&*store, case, "/conformance/prev/", base).await;
    let mut events = Vec::new();
    for _ in 0..3 {
        events.push(next_event(&mut history, case).await);
    }
    let revisions: Vec<Revision> = events.iter().map(Event::revision).collect();
    assert_eq!(revisions, vec![r1, r2, r3], "{case}: history");
    check_prev_values(case, &events);

    // The same three changes, seen live this time.
    let mut live = open_watch(&*store, case, "/conformance/prev/", r3).await;
    let r4 = commit(&*store, case, vec![create(key, "v1")]).await;
    let r5 = commit(&*store, case, vec![put(key, "v2")]).await;
    let r6 = commit(
        &*store,
        case,
        vec![Op::Delete {
            key: key.into(),
            mod_revision: None,
        }],
    )
    .await;
    let mut events = Vec::new();
    for _ in 0..3 {
        events.push(next_event(&mut live, case).await);
    }
    let revisions: Vec<Revision> = events.iter().map(Event::revision).collect();
    assert_eq!(revisions, vec![r4, r5, r6], "{case}: live");
    check_prev_values(case, &events);
}

/// Checks create v1, put v2, delete of one key, as three events.
fn check_prev_values(case: &str, events: &[Event]) {
    let [created, replaced, deleted] = events else {
        panic!("{case}: expected three events, got {events:?}");
    };
    let (r1, r2, r3) = (created.revision(), replaced.revision(), deleted.revision());
    assert_eq!(created.kind, EventKind::Put, "{case}: create");
    assert_eq!(
        (created.kv.value.clone(), created.kv.create_revision),
        (b("v1"), r1),
        "{case}: create"
    );
    assert_eq!(created.prev, None, "{case}: a create has no prev");

    assert_eq!(replaced.kind, EventKind::Put, "{case}: put");
    assert_eq!(
        (replaced.kv.value.clone(), replaced.kv.create_revision),
        (b("v2"), r1),
        "{case}: put"
    );
    let prev = replaced
        .prev
        .clone()
        .unwrap_or_else(|| panic!("{case}: put without prev"));
    assert_eq!(
        (prev.value, prev.create_revision, prev.mod_revision),
        (b("v1"), r1, r1),
        "{case}: put prev"
    );

    assert_eq!(deleted.kind, EventKind::Delete, "{case}: delete");
    assert!(
        deleted.kv.value.is_empty(),
        "{case}: a delete event has a value"
    );
    assert_eq!(
        deleted.kv.create_revision, 0,
        "{case}: a delete event's create revision"
    );
    assert!(r3 > r2, "{case}: delete event revision");
    let prev = deleted
        .prev
        .clone()
        .unwrap_or_else(|| panic!("{case}: delete without prev"));
    assert_eq!(
        (prev.value, prev.create_revision, prev.mod_revision),
        (b("v2"), r1, r2),
        "{case}: delete prev"
    );
}

/// Many concurrent writers: every watcher sees each revision exactly once, in order.
pub async fn watch_order_with_concurrent_writers<S: Store>(store: Arc<S>) {
    let case = "watch_order_with_concurrent_writers";
    let p = "/conformance/order/";
    let base = current(&*store, case).await;
    let (writers, per_writer) = (16, 50);
    let total = writers * per_writer;
    // The watchers read while the writers write, so that they are live, not replaying.
    let mut readers = Vec::new();
    for _ in 0..3 {
        let mut watch = open_watch(&*store, case, p, base).await;
        readers.push(tokio::spawn(async move {
            let mut seen = Vec::with_capacity(total);
            for _ in 0..total {
                let event = next_event(&mut watch, case).await;
                seen.push((event.revision(), event.kv.key));
            }
            (seen, watch)
        }));
    }
    let mut tasks = Vec::new();
    for w in 0..writers {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..per_writer {
                let key = format!("{p}{w:02}/{i:03}");
                acked.push((commit(&*store, case, vec![create(&key, "v")]).await, key));
            }
            acked
        }));
    }
    let mut acked = BTreeMap::new();
    for task in tasks {
        acked.extend(task.await.expect("writer task"));
    }
    assert_eq!(acked.len(), total, "{case}: revisions shared between txns");
    let acked: Vec<(Revision, String)> = acked.into_iter().collect();
    for reader in readers {
        let (seen, mut watch) = reader.await.expect("reader task");
        if let Some(pos) = seen.windows(2).position(|w| w[0].0 >= w[1].0) {
            panic!(
                "{case}: revision {} followed by {}",
                seen[pos].0,
                seen[pos + 1].0
            );
        }
        assert_eq!(
            seen, acked,
            "{case}: a watcher missed, repeated or misplaced an event"
        );
        assert_quiet(&mut watch, case).await;
    }
}

/// A watcher that reads nothing while 10k writes happen neither blocks the writers nor loses
/// anything: it gets every event, in order, when it reads again.
pub async fn slow_watcher_gets_everything<S: Store>(store: Arc<S>) {
    let case = "slow_watcher_gets_everything";
    let p = "/conformance/slow/";
    let base = current(&*store, case).await;
    let mut slow = open_watch(&*store, case, p, base).await;
    // Read one event first, so that the watcher is live (not replaying) when it stops reading.
    let first = commit(&*store, case, vec![put(&format!("{p}first"), "v")]).await;
    assert_eq!(
        next_event(&mut slow, case).await.revision(),
        first,
        "{case}"
    );
    let (writers, per_writer) = (50, 200);
    let mut tasks = Vec::new();
    for w in 0..writers {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            for i in 0..per_writer {
                let key = format!("{p}{w:02}/{i:03}");
                commit(&*store, case, vec![create(&key, "0123456789abcdef")]).await;
            }
        }));
    }
    // The watcher is not polled at all meanwhile: if writers waited for it, this would hang.
    let all_written = async {
        for task in tasks {
            task.await.expect("writer task");
        }
    };
    if tokio::time::timeout(Duration::from_secs(240), all_written)
        .await
        .is_err()
    {
        panic!("{case}: writers did not finish while a watcher was not reading");
    }
    let total = (writers * per_writer) as u64;
    assert_eq!(current(&*store, case).await, first + total, "{case}");
    for expected in first + 1..=first + total {
        let event = next_event(&mut slow, case).await;
        assert_eq!(
            event.revision(),
            expected,
            "{case}: gap or repeat in a slow watcher's stream"
        );
    }
    let live = commit(&*store, case, vec![put(&format!("{p}live"), "v")]).await;
    assert_eq!(
        next_event(&mut slow, case).await.revision(),
        live,
        "{case}: not live again"
    );
}

/// Compaction drops history (a watch from before it fails at once) but keeps current values.
pub async fn compaction<S: Store>(store: Arc<S>) {
    let case = "compaction";
    let p = "/conformance/compact/";
    let mut revisions = Vec::new();
    for i in 0..5 {
        revisions.push(commit(&*store, case, vec![put(&format!("{p}{i}"), "v")]).await);
    }
    assert_eq!(
        store.compacted_revision().await.expect("compacted"),
        0,
        "{case}: fresh store"
    );
    let at = revisions[2];
    store.compact(at).await.expect("compact");
    assert_eq!(
        store.compacted_revision().await.expect("compacted"),
        at,
        "{case}"
    );

    for after in [0, at - 1] {
        match store.watch(p, after).await {
            Err(StoreError::Compacted {
                requested,
                compacted,
            }) => {
                assert_eq!((requested, compacted), (after, at), "{case}");
            }
            Err(other) => panic!("{case}: watch after {after}: {other}"),
            Ok(_) => panic!("{case}: watch after {after} below compacted {at} succeeded"),
        }
    }
    let mut watch = open_watch(&*store, case, p, at).await;
    for rev in &revisions[3..] {
        assert_eq!(
            next_event(&mut watch, case).await.revision(),
            *rev,
            "{case}: history after {at}"
        );
    }
    assert_eq!(
        store.list(p, None, 0).await.expect("list").kvs.len(),
        5,
        "{case}: values dropped"
    );

    store
        .compact(revisions[1])
        .await
        .expect("compacting backwards is a no-op");
    assert_eq!(
        store.compacted_revision().await.expect("compacted"),
        at,
        "{case}: went backwards"
    );
    let now = current(&*store, case).await;
    match store.compact(now + 1).await {
        Err(StoreError::Invalid(_)) => {}
        other => panic!("{case}: compact beyond the current revision gave {other:?}"),
    }
    store
        .compact(now)
        .await
        .expect("compact to the current revision");
    let mut watch = open_watch(&*store, case, p, now).await;
    let next = commit(&*store, case, vec![put(&format!("{p}x"), "v")]).await;
    assert_eq!(
        next_event(&mut watch, case).await.revision(),
        next,
        "{case}: live after compaction"
    );
}

/// When compaction overtakes a watcher that has not read, the watcher gets a contiguous run of
/// events and then, if it needed dropped history, `Compacted` and the end of the stream.
pub async fn compaction_overtaking_a_watcher<S: Store>(store: Arc<S>) {
    let case = "compaction_overtaking_a_watcher";
    let p = "/conformance/overtake/";
    let base = current(&*store, case).await;
    let mut watch = open_watch(&*store, case, p, base).await;
    let first = commit(&*store, case, vec![put(&format!("{p}first"), "v")]).await;
    assert_eq!(
        next_event(&mut watch, case).await.revision(),
        first,
        "{case}"
    );
    let mut tasks = Vec::new();
    for w in 0..30 {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            for i in 0..100 {
                commit(&*store, case, vec![put(&format!("{p}{w}"), &i.to_string())]).await;
            }
        }));
    }
    for task in tasks {
        task.await.expect("writer task");
    }
    let last = current(&*store, case).await;
    assert_eq!(last, first + 3000, "{case}");
    store.compact(last).await.expect("compact");
    let mut expected = first + 1;
    loop {
        match tokio::time::timeout(Duration::from_secs(5), watch.next()).await {
            Ok(Some(Ok(event))) => {
                assert_eq!(event.revision(), expected, "{case}: gap before compaction");
                expected += 1;
            }
            Ok(Some(Err(StoreError::Compacted { compacted, .. }))) => {
                assert_eq!(compacted, last, "{case}");
                let after = tokio::time::timeout(EVENT_TIMEOUT, watch.next()).await;
                assert!(
                    matches!(after, Ok(None)),
                    "{case}: stream goes on after Compacted"
                );
                return;
            }
            Ok(Some(Err(other))) => panic!("{case}: {other}"),
            Ok(None) => panic!("{case}: stream ended without an error"),
            // Everything was delivered and nothing more comes: the watcher never fell behind.
            Err(_) => {
                assert_eq!(
                    expected,
                    last + 1,
                    "{case}: stalled before the end without an error"
                );
                return;
            }
        }
    }
}

/// A synced watch yields the replayed events under its prefix, then the mark at the store's
/// revision when it opened (past events of other prefixes), then live events.
pub async fn watch_synced_marks_the_end_of_the_replay<S: Store>(store: Arc<S>) {
    let case = "watch_synced_marks_the_end_of_the_replay";
    let p = "/conformance/wsync/";
    let other = "/conformance/wsync-other/";
    let r1 = commit(&*store, case, vec![put(&format!("{p}a"), "1")]).await;
    commit(&*store, case, vec![put(&format!("{other}x"), "1")]).await;
    let r3 = commit(&*store, case, vec![put(&format!("{p}b"), "1")]).await;
    let r4 = commit(&*store, case, vec![put(&format!("{other}y"), "1")]).await;
    let mut watch = open_synced(&*store, case, p, r1).await;
    match next_item(&mut watch, case).await {
        Ok(event) => assert_eq!(
            (event.revision(), event.kv.key),
            (r3, format!("{p}b")),
            "{case}: replayed event"
        ),
        Err(mark) => panic!("{case}: marked synced at {mark} before the replayed event"),
    }
    assert_eq!(
        next_item(&mut watch, case).await.map(|e| e.revision()),
        Err(r4),
        "{case}: the mark follows the replay, at the revision of the call"
    );
    let r5 = commit(&*store, case, vec![put(&format!("{p}c"), "1")]).await;
    commit(&*store, case, vec![put(&format!("{other}z"), "1")]).await;
    let r7 = commit(&*store, case, vec![put(&format!("{p}d"), "1")]).await;
    for want in [r5, r7] {
        assert_eq!(
            next_item(&mut watch, case).await.map(|e| e.revision()),
            Ok(want),
            "{case}: live events, no second mark"
        );
    }
}

/// With no event under the prefix to replay, the mark comes at once, with no later write:
/// from a past revision, from the current one and from the future.
pub async fn watch_synced_with_nothing_to_replay<S: Store>(store: Arc<S>) {
    let case = "watch_synced_with_nothing_to_replay";
    let p = "/conformance/wsync-none/";
    let base = commit(&*store, case, vec![put(&format!("{p}a"), "1")]).await;
    for i in 0..3 {
        commit(
            &*store,
            case,
            vec![put(&format!("/conformance/elsewhere/{i}"), "1")],
        )
        .await;
    }
    let now = current(&*store, case).await;
    for after in [base, now, now + 5] {
        let t0 = std::time::Instant::now();
        let mut watch = open_synced(&*store, case, p, after).await;
        assert_eq!(
            next_item(&mut watch, case).await.map(|e| e.revision()),
            Err(now),
            "{case}: after {after}"
        );
        // Not a quiet spell: the mark is what ends the replay.
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "{case}: after {after}: the mark took {:?}",
            t0.elapsed()
        );
        if let Ok(item) = tokio::time::timeout(Duration::from_millis(300), watch.next()).await {
            panic!("{case}: after {after}: expected nothing more, got {item:?}");
        }
    }
}

/// A synced watch from compacted history fails as a plain one does.
pub async fn watch_synced_from_compacted_history<S: Store>(store: Arc<S>) {
    let case = "watch_synced_from_compacted_history";
    let p = "/conformance/wsync-compacted/";
    let mut revisions = Vec::new();
    for i in 0..3 {
        revisions.push(commit(&*store, case, vec![put(&format!("{p}{i}"), "v")]).await);
    }
    store.compact(revisions[1]).await.expect("compact");
    let compacted = match store.watch_synced(p, revisions[0]).await {
        Err(e) => e,
        Ok(mut watch) => match tokio::time::timeout(EVENT_TIMEOUT, watch.next()).await {
            Ok(Some(Err(e))) => e,
            other => panic!("{case}: watch below the compaction gave {other:?}"),
        },
    };
    assert!(
        matches!(compacted, StoreError::Compacted { .. }),
        "{case}: {compacted}"
    );
}

/// Malformed transactions are refused before anything is written.
pub async fn validation_limits<S: Store>(store: Arc<S>) {
    let case = "validation_limits";
    let p = "/conformance/limits/";
    let before = current(&*store, case).await;
    let big_key = format!("{p}{}", "k".repeat(MAX_KEY_BYTES));
    let big_value = Bytes::from(vec![b'v'; MAX_VALUE_BYTES + 1]);
    let too_many: Vec<Op> = (0..=MAX_TXN_OPS)
        .map(|i| create(&format!("{p}many/{i}"), "v"))
        .collect();
    let invalid: Vec<(&str, Vec<Op>)> = vec![
        ("empty txn", vec![]),
        ("empty key", vec![create("", "v")]),
        ("oversized key", vec![create(&big_key, "v")]),
        (
            "oversized value",
            vec![Op::Put {
                key: format!("{p}big"),
                value: big_value,
            }],
        ),
        ("too many ops", too_many),
        (
            "duplicate key",
            vec![create(&format!("{p}d"), "1"), put(&format!("{p}d"), "2")],
        ),
        (
            "duplicate delete",
            vec![
                Op::Delete {
                    key: format!("{p}d"),
                    mod_revision: None,
                },
                Op::Update {
                    key: format!("{p}d"),
                    value: b("x"),
                    mod_revision: 1,
                },
            ],
        ),
        (
            "key under a deleted prefix",
            vec![
                put(&format!("{p}x"), "1"),
                Op::DeletePrefix { prefix: p.into() },
                put("/conformance/z", "2"),
            ],
        ),
        (
            "nested delete prefixes",
            vec![
                Op::DeletePrefix { prefix: p.into() },
                Op::DeletePrefix {
                    prefix: format!("{p}sub/"),
                },
            ],
        ),
    ];
    for (what, ops) in invalid {
        match store.txn(ops).await {
            Err(StoreError::Invalid(_)) => {}
            other => panic!("{case}: {what} gave {other:?}"),
        }
    }
    assert_eq!(
        current(&*store, case).await,
        before,
        "{case}: an invalid txn took a revision"
    );
    assert!(
        store.list(p, None, 0).await.expect("list").kvs.is_empty(),
        "{case}: wrote something"
    );

    // The limits themselves are allowed.
    let most: Vec<Op> = (0..MAX_TXN_OPS)
        .map(|i| create(&format!("{p}most/{i:03}"), "v"))
        .collect();
    commit(&*store, case, most).await;
    let longest = format!("{p}{}", "k".repeat(MAX_KEY_BYTES - p.len()));
    commit(
        &*store,
        case,
        vec![Op::Put {
            key: longest,
            value: Bytes::from(vec![b'v'; MAX_VALUE_BYTES]),
        }],
    )
    .await;
    // Sibling prefixes and a key equal to nothing else are fine together.
    commit(
        &*store,
        case,
        vec![
            Op::DeletePrefix {
                prefix: format!("{p}most/0"),
            },
            put(&format!("{p}most/1x"), "v"),
        ],
    )
    .await;
    assert_eq!(current(&*store, case).await, before + 3, "{case}");
}
