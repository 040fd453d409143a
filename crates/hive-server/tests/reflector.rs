//! `hive-client`'s resumable reflector against a real server (HTTP on loopback, embedded
//! store, watch cache): a resume ends its catch-up on the server's end-of-replay bookmark,
//! at once, rather than after a quiet spell.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{add_tenant as tenant, launch as start, service};
use hive_api::Service;
use hive_client::Client;
use hive_client::reflector::{CATCH_UP_QUIET, Cursor, Saved, Start, reflect_resumable};
use tokio::sync::{Mutex, mpsc, watch};

/// A resumed reflector of `acme`'s services from `saved`: how long until it counted as
/// synced, how it started, and what its store then held.
async fn resume(c: &Client, saved: Saved<Service>) -> (Duration, Start, BTreeMap<String, u32>) {
    let store = Arc::new(Mutex::new(BTreeMap::new()));
    let (changed, mut names) = mpsc::unbounded_channel();
    let (synced, mut ready) = watch::channel(false);
    let (cursor, cursor_rx) = watch::channel(Cursor::default());
    let t0 = Instant::now();
    let task = tokio::spawn(reflect_resumable(
        c.clone(),
        Some("acme".into()),
        store.clone(),
        changed,
        synced,
        cursor,
        Some(saved),
    ));
    tokio::time::timeout(Duration::from_secs(10), ready.wait_for(|s| *s))
        .await
        .expect("synced within 10 s")
        .unwrap();
    let took = t0.elapsed();
    let start = cursor_rx.borrow().start.clone();
    let held = store
        .lock()
        .await
        .iter()
        .map(|(n, s): (&String, &Service)| (n.clone(), s.spec.replicas))
        .collect();
    task.abort();
    while names.try_recv().is_ok() {}
    (took, start, held)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_ends_its_catch_up_on_the_servers_bookmark_without_waiting() {
    let s = start().await;
    let c = &s.client;
    tenant(c, "acme").await;
    tenant(c, "other").await;
    for (name, replicas) in [("web", 1), ("api", 2), ("db", 3)] {
        c.create(Some("acme"), &service(name, replicas))
            .await
            .unwrap();
    }
    let list = c.list::<Service>(Some("acme")).await.unwrap();
    let saved = Saved {
        revision: list.revision,
        objects: list.items,
    };
    // The store moves on elsewhere: the replay from the saved revision has no event of acme.
    for name in ["a", "b", "c"] {
        c.create(Some("other"), &service(name, 1)).await.unwrap();
    }
    let now = c
        .list_page::<Service>(Some("other"), Some(1), None)
        .await
        .unwrap()
        .revision;
    assert!(now > saved.revision);

    // Zero changes: synced as soon as the bookmark arrives, far sooner than a quiet spell.
    let (took, start, held) = resume(c, saved.clone()).await;
    assert_eq!(
        start,
        Start::Resumed {
            from: saved.revision,
            to: now,
            changes: 0,
            caught_up: true
        }
    );
    eprintln!("resume with 0 changes: synced after {took:?}");
    assert_eq!(held.len(), 3);
    assert!(
        took < Duration::from_millis(500) && took < CATCH_UP_QUIET,
        "a resume with nothing to replay took {took:?}"
    );

    // Changes since the saved revision are applied before it counts as synced.
    let mut web = c.get::<Service>(Some("acme"), "web").await.unwrap();
    web.spec.replicas = 5;
    c.update(Some("acme"), &web).await.unwrap();
    c.delete::<Service>(Some("acme"), "db").await.unwrap();
    let (took, start, held) = resume(c, saved.clone()).await;
    let Start::Resumed {
        from,
        changes,
        caught_up,
        ..
    } = start
    else {
        panic!("listed instead of resumed: {start:?}");
    };
    assert_eq!((from, changes, caught_up), (saved.revision, 2, true));
    assert_eq!(
        held,
        BTreeMap::from([("api".to_owned(), 2), ("web".to_owned(), 5)])
    );
    assert!(
        took < CATCH_UP_QUIET,
        "a resume with 2 changes took {took:?}"
    );
}
