//! API servers on etcd (a real `/usr/bin/etcd`): two servers on one etcd see each other's
//! writes, and a server's embedded store migrated into etcd serves on. The etcd processes
//! come from hive-store's test support.

#[path = "../../hive-store/tests/support/mod.rs"]
mod support;

use std::time::Duration;

use futures_util::StreamExt;
use hive_api::{Tenant, WatchEventType};
use hive_client::Client;
use hive_server::{ADMIN_TOKEN_FILE, LaunchError, Launched, ServerConfig, StoreBackend};
use support::EtcdCluster;

async fn launch(etcd: &EtcdCluster, dir: &tempfile::TempDir) -> Result<Launched, LaunchError> {
    let config = ServerConfig {
        data_dir: dir.path().to_owned(),
        store: StoreBackend::Etcd(etcd.store_options()),
        ..Default::default()
    };
    hive_server::launch(
        config,
        "127.0.0.1:0".parse().unwrap(),
        std::future::pending(),
    )
    .await
}

fn tenant(name: &str) -> Tenant {
    Tenant {
        name: name.into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_share_one_etcd() {
    let etcd = EtcdCluster::start(1);
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = launch(&etcd, &dir_a).await.expect("server a");
    assert!(a.bootstrapped, "the first server bootstraps the store");

    // The second finds the store bootstrapped and needs the admin token copied over.
    match launch(&etcd, &dir_b).await {
        Err(LaunchError::MissingAdminToken { path }) => {
            assert_eq!(path, dir_b.path().join(ADMIN_TOKEN_FILE));
        }
        other => panic!("expected MissingAdminToken, got {other:?}"),
    }
    std::fs::copy(
        dir_a.path().join(ADMIN_TOKEN_FILE),
        dir_b.path().join(ADMIN_TOKEN_FILE),
    )
    .unwrap();
    let b = launch(&etcd, &dir_b).await.expect("server b");
    assert!(!b.bootstrapped);
    assert_eq!(a.admin_token, b.admin_token);

    // One client's session on both servers: what it writes through one it reads through the
    // other (the servers' watch caches are consistent per session, not across sessions).
    let client_a = Client::new(&a.url, Some(a.admin_token.clone())).unwrap();
    let client_b = client_a.for_server(&b.url).unwrap();
    let mut watch_b = client_b
        .watch::<Tenant>(None, None)
        .await
        .expect("watch on b");

    let created = client_a
        .create(None, &tenant("acme"))
        .await
        .expect("create on a");
    let read = client_b
        .get::<Tenant>(None, "acme")
        .await
        .expect("get on b");
    assert_eq!(read.uid, created.uid);
    assert_eq!(read.revision, created.revision);
    let listed = client_b.list::<Tenant>(None).await.expect("list on b");
    assert!(listed.items.iter().any(|t| t.name == "acme"));

    let event = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let event = watch_b
                .next()
                .await
                .expect("watch ended")
                .expect("watch item");
            if event.type_ != WatchEventType::Bookmark {
                return event;
            }
        }
    })
    .await
    .expect("b's watcher saw nothing of a's write");
    assert_eq!(event.type_, WatchEventType::Added);
    assert_eq!(event.object.expect("object").name, "acme");

    // Deleting through b is seen through a.
    client_b
        .delete::<Tenant>(None, "acme")
        .await
        .expect("delete on b");
    assert!(client_a.get::<Tenant>(None, "acme").await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_store_migrated_into_etcd_serves_on() {
    let dir = tempfile::tempdir().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let config = ServerConfig {
        data_dir: dir.path().to_owned(),
        ..Default::default()
    };
    let embedded = hive_server::launch(config, "127.0.0.1:0".parse().unwrap(), async {
        let _ = stopped.await;
    })
    .await
    .expect("server on the embedded store");
    let admin = Client::new(&embedded.url, Some(embedded.admin_token.clone())).unwrap();
    let created = admin.create(None, &tenant("acme")).await.expect("tenant");
    let request = hive_api::TokenCreate {
        name: "alice".into(),
        role: hive_api::Role::TenantAdmin,
        expires_in_secs: None,
    };
    let secret = admin
        .create_token(Some("acme"), &request)
        .await
        .expect("token")
        .token;
    let source_revision = embedded.store.current_revision().await.unwrap();
    stop.send(()).unwrap();
    let Launched { task, store, .. } = embedded;
    task.await.unwrap().unwrap();
    drop(store);

    let etcd = EtcdCluster::start(1);
    let to = StoreBackend::Etcd(etcd.store_options());
    let report = hive_server::migrate_store(dir.path(), &to)
        .await
        .expect("migrate");
    assert_eq!(report.source_revision, source_revision);
    assert!(report.keys >= 5, "{report:?}");
    // Into a store that is no longer empty: refused.
    assert!(matches!(
        hive_server::migrate_store(dir.path(), &to).await,
        Err(LaunchError::Migrate { .. })
    ));

    // The same data dir on etcd: nothing to bootstrap, the same tokens, the same objects.
    let on_etcd = launch(&etcd, &dir).await.expect("server on etcd");
    assert!(!on_etcd.bootstrapped);
    let admin = Client::new(&on_etcd.url, Some(on_etcd.admin_token.clone())).unwrap();
    let read = admin
        .get::<Tenant>(None, "acme")
        .await
        .expect("tenant on etcd");
    assert_eq!(read.uid, created.uid);
    let alice = Client::new(&on_etcd.url, Some(secret)).unwrap();
    let who = alice
        .whoami()
        .await
        .expect("the tenant token works on etcd");
    assert_eq!(who.tenant.as_deref(), Some("acme"));
}

/// Leadership on a 3-member etcd: one of two servers leads; when the etcd leader dies the
/// server keeps leading (or hands over cleanly, never two at once); when the leading server
/// dies, the other leads within the failover bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_server_leads_and_another_takes_over_when_it_dies() {
    use hive_server::leader::{self, State};
    let mut etcd = EtcdCluster::start(3);
    let store = |etcd: &EtcdCluster| {
        let opts = etcd.store_options();
        async move {
            std::sync::Arc::new(hive_store::EtcdStore::connect(opts).await.unwrap())
                as std::sync::Arc<dyn hive_store::Store>
        }
    };
    let (sa, sb) = (store(&etcd).await, store(&etcd).await);
    let ttl = leader::DEFAULT_TTL;
    let (txa, rxa) = tokio::sync::watch::channel(State::Following { leader: None });
    let (txb, rxb) = tokio::sync::watch::channel(State::Following { leader: None });
    let a = tokio::spawn(leader::elect(sa, "a".into(), ttl, txa));
    let mut rxa2 = rxa.clone();
    tokio::time::timeout(
        Duration::from_secs(10),
        rxa2.wait_for(|s| matches!(s, State::Leading { .. })),
    )
    .await
    .expect("a leads")
    .unwrap();
    let b = tokio::spawn(leader::elect(sb, "b".into(), ttl, txb));
    // Never two leaders, through an etcd leader's death.
    let both = |a: &tokio::sync::watch::Receiver<State>,
                b: &tokio::sync::watch::Receiver<State>| {
        matches!(*a.borrow(), State::Leading { .. }) && matches!(*b.borrow(), State::Leading { .. })
    };
    let killed = etcd.wait_leader(Duration::from_secs(10));
    etcd.kill(killed);
    for _ in 0..(3 * ttl.as_millis() / 50) {
        assert!(!both(&rxa, &rxb), "two leaders at once");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        matches!(*rxa.borrow(), State::Leading { .. })
            || matches!(*rxb.borrow(), State::Leading { .. }),
        "no leader after the etcd leader died"
    );
    // The leading server dies: the other leads within ttl and a poll (plus etcd's reads).
    let (dead, mut other) = if matches!(*rxa.borrow(), State::Leading { .. }) {
        (a, rxb.clone())
    } else {
        (b, rxa.clone())
    };
    let t0 = std::time::Instant::now();
    dead.abort();
    tokio::time::timeout(
        Duration::from_secs(10),
        other.wait_for(|s| matches!(s, State::Leading { .. })),
    )
    .await
    .expect("the other server leads")
    .unwrap();
    let failover = t0.elapsed();
    eprintln!("leadership failover {failover:?} (ttl {ttl:?})");
    assert!(
        failover <= Duration::from_secs(5),
        "failover took {failover:?}"
    );
}

/// A TCP relay between a server and etcd that can black-hole traffic: while cut, connections
/// stay open and accepted but nothing passes (packets lost, as in a network partition); healed,
/// the held connections are closed so that clients connect again.
struct Partition {
    port: u16,
    cut: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Partition {
    async fn start(upstream: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (cut, _) = tokio::sync::watch::channel(false);
        let rx = cut.subscribe();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut down, _)) = listener.accept().await else {
                    return;
                };
                let mut cut = rx.clone();
                tokio::spawn(async move {
                    // Accepted while cut: hold it, silent, until healed.
                    if *cut.borrow_and_update() {
                        until(&mut cut, false).await;
                        return;
                    }
                    let Ok(mut up) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                    else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut down, &mut up) => {}
                        _ = until(&mut cut, true) => {
                            // Cut: both sockets stay open, nothing moves, until healed.
                            until(&mut cut, false).await;
                        }
                    }
                });
            }
        });
        Self { port, cut, task }
    }

    fn set_cut(&self, cut: bool) {
        self.cut.send_replace(cut);
    }
}

/// Waits until the relay's state is `cut`.
async fn until(rx: &mut tokio::sync::watch::Receiver<bool>, cut: bool) {
    let _ = rx.wait_for(|c| *c == cut).await.map(drop);
}

impl Drop for Partition {
    fn drop(&mut self) {
        self.task.abort();
        self.set_cut(false);
    }
}

/// One server partitioned from etcd: it stops leading, its reads turn into 503 with
/// Retry-After once its watch cache is past the staleness bound, its writes fail with 503, the
/// other server leads and serves; healed, it serves again and sees what happened meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_partitioned_from_etcd_stops_leading_and_answers_503_then_recovers() {
    use hive_server::leader::{self, State};
    let etcd = EtcdCluster::start(1);
    let relay = Partition::start(etcd.members[0].client_port).await;
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let staleness = Duration::from_secs(1);
    let config = |dir: &tempfile::TempDir, endpoint: String| ServerConfig {
        data_dir: dir.path().to_owned(),
        store: StoreBackend::Etcd(hive_store::EtcdStoreOptions {
            endpoints: vec![endpoint],
            request_timeout: Duration::from_secs(1),
            failover_timeout: Duration::from_secs(2),
            ..etcd.store_options()
        }),
        watch_cache: Some(hive_store::WatchCacheOptions {
            max_staleness: staleness,
            probe_interval: Duration::from_millis(100),
            ..Default::default()
        }),
        ..Default::default()
    };
    let addr = "127.0.0.1:0".parse().unwrap();
    let a = hive_server::launch(
        config(&dir_a, format!("http://127.0.0.1:{}", relay.port)),
        addr,
        std::future::pending(),
    )
    .await
    .expect("server a");
    std::fs::copy(
        dir_a.path().join(ADMIN_TOKEN_FILE),
        dir_b.path().join(ADMIN_TOKEN_FILE),
    )
    .unwrap();
    let b = hive_server::launch(
        config(&dir_b, etcd.members[0].url()),
        addr,
        std::future::pending(),
    )
    .await
    .expect("server b");
    let ca = Client::new(&a.url, Some(a.admin_token.clone())).unwrap();
    let cb = Client::new(&b.url, Some(b.admin_token.clone())).unwrap();

    let ttl = leader::DEFAULT_TTL;
    let (txa, mut rxa) = tokio::sync::watch::channel(State::Following { leader: None });
    let (txb, mut rxb) = tokio::sync::watch::channel(State::Following { leader: None });
    let _ea = tokio::spawn(leader::elect(a.store.clone(), "a".into(), ttl, txa));
    tokio::time::timeout(
        Duration::from_secs(10),
        rxa.wait_for(|s| matches!(s, State::Leading { .. })),
    )
    .await
    .expect("a leads")
    .unwrap();
    let _eb = tokio::spawn(leader::elect(b.store.clone(), "b".into(), ttl, txb));
    ca.create(None, &tenant("before"))
        .await
        .expect("write through a");

    relay.set_cut(true);
    let cut = std::time::Instant::now();
    // Reads through a: 503 with Retry-After, and nothing answered past the bound.
    let http = reqwest::Client::new();
    let refused = loop {
        let asked = cut.elapsed();
        let resp = http
            .get(format!("{}/api/v1/tenants", a.url))
            .bearer_auth(&a.admin_token)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .expect("a answers");
        if resp.status().is_success() {
            assert!(
                asked <= staleness,
                "a answered a read {asked:?} after the cut, beyond its {staleness:?} bound"
            );
        } else {
            assert_eq!(resp.status(), 503, "a read through the partitioned server");
            assert!(
                resp.headers().get("retry-after").is_some(),
                "503 without Retry-After"
            );
            break asked;
        }
        assert!(
            asked < staleness + Duration::from_secs(1),
            "reads still answered {asked:?} after the cut"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Leadership: a stops before b takes over, b within a few seconds.
    tokio::time::timeout(
        Duration::from_secs(10),
        rxb.wait_for(|s| matches!(s, State::Leading { .. })),
    )
    .await
    .expect("b leads")
    .unwrap();
    assert!(
        !matches!(*rxa.borrow(), State::Leading { .. }),
        "a still leads while b does"
    );
    let took_over = cut.elapsed();
    // Writes through a fail (the outcome of one sent before the cut may be unknown: 503).
    match ca.create(None, &tenant("during-a")).await {
        Err(hive_client::ClientError::Api { status, .. }) => assert_eq!(status, 503),
        other => panic!("a write through the partitioned server gave {other:?}"),
    }
    // b serves on.
    let written = cb
        .create(None, &tenant("during-b"))
        .await
        .expect("write through b");
    eprintln!(
        "partition: b led after {took_over:?}, a refused reads after {refused:?}, b wrote at \
         revision {}",
        written.revision
    );

    relay.set_cut(false);
    let healed = std::time::Instant::now();
    let seen = loop {
        match ca.get::<Tenant>(None, "during-b").await {
            Ok(t) => break t,
            Err(_) if healed.elapsed() < Duration::from_secs(20) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("a does not serve 20 s after the partition healed: {e}"),
        }
    };
    assert_eq!(seen.uid, written.uid);
    assert!(
        ca.get::<Tenant>(None, "during-a").await.is_err(),
        "the write a refused is not there"
    );
    assert!(
        !matches!(*rxa.borrow(), State::Leading { .. }),
        "a leads again while b still does"
    );
}
