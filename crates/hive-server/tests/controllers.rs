//! The service controller against a real server (HTTP on loopback, embedded store): replicas
//! become instances, scaling adds and removes them, deleting a service deletes them, and
//! tenants do not touch each other.

mod common;

use std::time::{Duration, Instant};

use common::{Server, add_tenant, service};
use hive_api::{Event, Instance, POOL_BOUND_LABEL, Service};
use hive_api::{Node, NodeCapacity, NodeStatus};
use hive_client::Client;
use hive_server::controllers::scheduler::EVENT_DELAY;
use hive_server::controllers::services::STATUS_DELAY;
use hive_server::controllers::{Scheduler, ServiceController};

async fn start() -> Server {
    start_with(Scheduler::new).await
}

/// A server with the controllers, the scheduler made by `scheduler` from the admin client,
/// wired as `hive up` wires them: the service controller asks the scheduler to place each
/// instance as it creates it.
async fn start_with(scheduler: impl FnOnce(Client) -> Scheduler) -> Server {
    start_wired(scheduler, true).await
}

/// [`start_with`], with the service controller asking the scheduler (`placer`) or not (every
/// instance created unplaced, bound by the scheduler's own write).
async fn start_wired(scheduler: impl FnOnce(Client) -> Scheduler, placer: bool) -> Server {
    let server = common::launch().await;
    let client = server.client.clone();
    let scheduler = scheduler(client.clone());
    let mut services = ServiceController::new(client);
    if placer {
        services = services.with_placer(scheduler.placer());
    }
    tokio::spawn(services.run());
    tokio::spawn(scheduler.run());
    server
}

/// Waits until `tenant`'s instances of `svc` number `n`; returns them.
async fn instances(c: &Client, tenant: &str, svc: &str, n: usize) -> Vec<Instance> {
    let t0 = Instant::now();
    loop {
        let list = c.list::<Instance>(Some(tenant)).await.unwrap();
        let mine: Vec<Instance> = list
            .items
            .into_iter()
            .filter(|i| i.spec.service == svc)
            .collect();
        if mine.len() == n {
            return mine;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{tenant}/{svc}: {} instances, want {n}",
            mine.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_become_instances_and_follow_scaling_and_deletion() {
    let s = start().await;
    let c = &s.client;
    for t in ["acme", "other"] {
        add_tenant(c, t).await;
    }
    c.create(Some("acme"), &service("web", 3)).await.unwrap();
    c.create(Some("other"), &service("web", 1)).await.unwrap();
    let three = instances(c, "acme", "web", 3).await;
    for i in &three {
        assert!(i.name.starts_with("web-"));
        assert_eq!(i.spec.template.image, "busybox");
        assert_eq!(i.spec.node, None);
        assert_eq!(i.labels["hive.dev/service"], "web");
    }
    instances(c, "other", "web", 1).await;

    // Status reports what exists.
    let t0 = Instant::now();
    while c
        .get::<Service>(Some("acme"), "web")
        .await
        .unwrap()
        .status
        .replicas
        != 3
    {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "status.replicas never reached 3"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Scale down keeps the oldest.
    let mut svc = c.get::<Service>(Some("acme"), "web").await.unwrap();
    svc.spec.replicas = 1;
    svc.revision = 0;
    c.update(Some("acme"), &svc).await.unwrap();
    let one = instances(c, "acme", "web", 1).await;
    let oldest = three.iter().min_by_key(|i| i.created_at).unwrap();
    assert_eq!(one[0].name, oldest.name);

    // An instance deleted behind the controller's back is replaced.
    c.delete::<Instance>(Some("acme"), &one[0].name)
        .await
        .unwrap();
    let replaced = instances(c, "acme", "web", 1).await;
    assert_ne!(replaced[0].name, one[0].name);

    // Deleting the service deletes its instances; the other tenant keeps its own.
    c.delete::<Service>(Some("acme"), "web").await.unwrap();
    instances(c, "acme", "web", 0).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    instances(c, "other", "web", 1).await;

    // A tenant created after the controller started is served too.
    add_tenant(c, "late").await;
    c.create(Some("late"), &service("api", 2)).await.unwrap();
    instances(c, "late", "api", 2).await;
}

/// Network `name` of `tenant` on `subnet` (its gateway the default).
async fn add_network(c: &Client, tenant: &str, name: &str, subnet: &str) {
    let net = hive_api::Network {
        name: name.into(),
        spec: hive_api::NetworkSpec {
            subnet: subnet.into(),
            gateway: None,
        },
        ..Default::default()
    };
    c.create(Some(tenant), &net).await.unwrap();
}

async fn add_node(c: &Client, name: &str, cpu_millis: u64) {
    let n = c
        .create(
            None,
            &Node {
                name: name.into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let mut n = n;
    let cap = NodeCapacity {
        cpu_millis,
        memory_bytes: 8 << 30,
        network_bps: 10_000_000_000,
    };
    n.status = NodeStatus {
        capacity: cap.clone(),
        allocatable: cap,
        ready: true,
        lease_renewed_at: Some(chrono::Utc::now()),
        ..Default::default()
    };
    c.update_status(None, &n).await.unwrap();
}

/// An HTTP proxy to `upstream` that answers the next `fail` requests `hit` picks (by method
/// and path) with 503, as a server whose store is briefly unreachable would; everything
/// else, watch streams included, goes through. Returns its URL and the count of failures
/// left (to arm it again). Call it inside the runtime (it spawns the proxy's task).
fn flaky_proxy(
    upstream: String,
    fail: usize,
    hit: fn(&axum::http::Method, &str) -> bool,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use axum::body::Body;
    use axum::extract::Request;
    use axum::http::header;
    use axum::response::Response;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    let left = Arc::new(AtomicUsize::new(fail));
    let failures = left.clone();
    let http = reqwest::Client::new();
    let app = axum::Router::new().fallback(move |req: Request| {
        let (left, http, upstream) = (left.clone(), http.clone(), upstream.clone());
        async move {
            let (parts, body) = req.into_parts();
            if hit(&parts.method, parts.uri.path())
                && left
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
            {
                return Response::builder()
                    .status(503)
                    .header(header::CONTENT_TYPE, "application/json")
                    .body(Body::from(
                        r#"{"code":"unavailable","message":"injected: the store is unreachable"}"#,
                    ))
                    .unwrap();
            }
            let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
            let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
            let mut forward = http
                .request(parts.method.clone(), format!("{upstream}{path}"))
                .body(body);
            for (k, v) in &parts.headers {
                if k != header::HOST {
                    forward = forward.header(k, v);
                }
            }
            let answer = forward.send().await.unwrap();
            let mut out = Response::builder().status(answer.status());
            for (k, v) in answer.headers() {
                out = out.header(k, v);
            }
            out.body(Body::from_stream(answer.bytes_stream())).unwrap()
        }
    });
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), failures)
}

/// An instance update (the scheduler's binding).
fn instance_update(m: &axum::http::Method, path: &str) -> bool {
    m == axum::http::Method::PUT && path.contains("/instances/")
}

/// An instance create (the service controller's).
fn instance_create(m: &axum::http::Method, path: &str) -> bool {
    m == axum::http::Method::POST && path.ends_with("/instances")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bindings_refused_for_a_passing_reason_are_tried_again() {
    // Every one of the first bindings is refused: with nothing else changing, only a retry
    // of its own can place an instance. (Every instance is bound by the scheduler: none is
    // placed as it is created.)
    let s = start_wired(
        |admin| {
            let (flaky, _) = flaky_proxy(admin.base().to_owned(), 8, instance_update);
            Scheduler::new(Client::new(&flaky, admin.token().map(str::to_owned)).unwrap())
        },
        false,
    )
    .await;
    let c = s.client.clone();
    add_node(&c, "n1", 4000).await;
    add_tenant(&c, "acme").await;
    c.create(Some("acme"), &service("web", 5)).await.unwrap();
    until(&c, "acme", "5 placed after refused bindings", |i| {
        i.len() == 5 && i.iter().all(|i| i.spec.node.is_some())
    })
    .await;
}

/// Waits until every instance of `tenant` satisfies `done`.
async fn until(
    c: &Client,
    tenant: &str,
    what: &str,
    done: impl Fn(&[Instance]) -> bool,
) -> Vec<Instance> {
    let t0 = Instant::now();
    loop {
        let items = c.list::<Instance>(Some(tenant)).await.unwrap().items;
        if done(&items) {
            return items;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{tenant}: {what}: {items:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_are_placed_on_tenant_exclusive_nodes_and_the_rest_wait_with_a_reason() {
    let s = start().await;
    let c = &s.client;
    add_node(c, "n1", 4000).await;
    add_node(c, "n2", 4000).await;
    for t in ["a", "b", "c"] {
        add_tenant(c, t).await;
    }
    let mut web = service("web", 3);
    web.spec.template.resources.requests.cpu_millis = Some(1000);
    c.create(Some("a"), &web).await.unwrap();
    let a = until(c, "a", "3 placed", |i| {
        i.len() == 3 && i.iter().all(|i| i.spec.node.is_some())
    })
    .await;
    let a_node = a[0].spec.node.clone().unwrap();
    assert!(
        a.iter()
            .all(|i| i.spec.node.as_deref() == Some(a_node.as_str())),
        "a fills its own node first"
    );
    assert_eq!(
        c.get::<Node>(None, &a_node)
            .await
            .unwrap()
            .spec
            .tenant
            .as_deref(),
        Some("a")
    );

    c.create(Some("b"), &service("db", 1)).await.unwrap();
    let b = until(c, "b", "placed", |i| {
        i.len() == 1 && i[0].spec.node.is_some()
    })
    .await;
    let b_node = b[0].spec.node.clone().unwrap();
    assert_ne!(b_node, a_node, "b never shares a's node");

    // No node left for c: pending, with every node's reason.
    c.create(Some("c"), &service("x", 1)).await.unwrap();
    let pending = until(c, "c", "unschedulable", |i| {
        i.len() == 1 && i[0].status.reason == "Unschedulable"
    })
    .await;
    assert_eq!(pending[0].spec.node, None);
    assert_eq!(
        pending[0].status.message,
        "0/2 nodes available: 2 bound to another tenant"
    );

    // More than a's node holds: the 5th replica needs a new node, and none is free.
    let mut more = c.get::<Service>(Some("a"), "web").await.unwrap();
    more.spec.replicas = 5;
    more.revision = 0;
    c.update(Some("a"), &more).await.unwrap();
    let a = until(c, "a", "4 placed, 1 waiting", |i| {
        i.len() == 5 && i.iter().filter(|i| i.spec.node.is_some()).count() == 4
    })
    .await;
    let waiting = a.iter().find(|i| i.spec.node.is_none()).unwrap();
    until(c, "a", "reason", |i| {
        i.iter()
            .any(|i| i.name == waiting.name && i.status.reason == "Unschedulable")
    })
    .await;

    // A new node: the waiting instances of a and c are placed, each on a node of its own tenant.
    add_node(c, "n3", 4000).await;
    add_node(c, "n4", 4000).await;
    until(c, "a", "all placed", |i| {
        i.len() == 5 && i.iter().all(|i| i.spec.node.is_some())
    })
    .await;
    let cs = until(c, "c", "placed", |i| {
        i.len() == 1 && i[0].spec.node.is_some()
    })
    .await;
    let a_nodes: std::collections::BTreeSet<String> = c
        .list::<Instance>(Some("a"))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|i| i.spec.node)
        .collect();
    assert!(!a_nodes.contains(cs[0].spec.node.as_ref().unwrap()));
    assert_eq!(a_nodes.len(), 2);
}

/// Renews `name`'s lease every 200 ms until the returned handle is aborted.
fn keep_lease(c: &Client, name: &str) -> tokio::task::JoinHandle<()> {
    let (c, name) = (c.clone(), name.to_owned());
    tokio::spawn(async move {
        loop {
            if let Ok(mut n) = c.get::<Node>(None, &name).await {
                n.status.lease_renewed_at = Some(chrono::Utc::now());
                n.status.ready = true;
                let _ = c.update_status(None, &n).await;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_stops_renewing_its_lease_is_lost_and_its_instances_replaced() {
    let s = start().await;
    let c = &s.client;
    let grace = Duration::from_secs(2);
    tokio::spawn(hive_server::controllers::NodeController::new(c.clone(), grace).run());
    add_tenant(c, "acme").await;
    for n in ["n1", "n2", "n3"] {
        add_node(c, n, 4000).await;
        // One tenant may hold several exclusive nodes only if they are shared here.
        let mut node = c.get::<Node>(None, n).await.unwrap();
        node.spec.shared = true;
        c.update(None, &node).await.unwrap();
    }
    let leases: Vec<_> = ["n1", "n2", "n3"]
        .iter()
        .map(|n| keep_lease(c, n))
        .collect();
    c.create(Some("acme"), &service("web", 3)).await.unwrap();
    // Spread: one per node.
    let placed = until(c, "acme", "3 placed on 3 nodes", |items| {
        let nodes: std::collections::BTreeSet<_> =
            items.iter().filter_map(|i| i.spec.node.clone()).collect();
        items.len() == 3 && nodes.len() == 3
    })
    .await;
    let on_n1 = placed
        .iter()
        .find(|i| i.spec.node.as_deref() == Some("n1"))
        .unwrap()
        .name
        .clone();

    // n1's agent dies: its lease stops. Within the grace (2 s) plus a sweep, n1 is not ready,
    // its instance is gone and a replacement runs on another node.
    leases[0].abort();
    let t0 = Instant::now();
    let after = until(c, "acme", "the n1 instance replaced elsewhere", |items| {
        items.len() == 3
            && items.iter().all(|i| i.name != on_n1)
            && items
                .iter()
                .all(|i| i.spec.node.as_deref().is_some_and(|n| n != "n1"))
    })
    .await;
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(8), "replacement took {took:?}");
    assert_eq!(after.len(), 3);
    assert!(!c.get::<Node>(None, "n1").await.unwrap().status.ready);
    let events = c.list::<hive_api::Event>(Some("acme")).await.unwrap().items;
    assert!(
        events
            .iter()
            .any(|e| e.reason == "NodeLost" && e.message.contains(&on_n1)),
        "{events:#?}"
    );

    // n1 comes back: ready again, nothing is added (the service holds 3).
    let back = keep_lease(c, "n1");
    let t0 = Instant::now();
    while !c.get::<Node>(None, "n1").await.unwrap().status.ready {
        assert!(t0.elapsed() < Duration::from_secs(5), "n1 not ready again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(instances(c, "acme", "web", 3).await.len(), 3);
    back.abort();
    for l in leases {
        l.abort();
    }
}

#[tokio::test]
async fn a_full_network_leaves_instances_pending_with_a_reason_until_addresses_free_up() {
    let s = start().await;
    let c = &s.client;
    add_node(c, "n1", 64_000).await;
    add_tenant(c, "a").await;
    // A /29 has five addresses: the service's VIP takes the first, instances the other four.
    add_network(c, "a", "tiny", "10.60.0.0/29").await;
    let mut web = service("web", 7);
    web.spec.template.network = Some("tiny".into());
    let made = c.create(Some("a"), &web).await.unwrap();
    assert_eq!(made.status.vip, "10.60.0.2");
    let placed = until(c, "a", "4 placed, 3 waiting for an address", |i| {
        i.len() == 7
            && i.iter().filter(|i| i.spec.node.is_some()).count() == 4
            && i.iter()
                .filter(|i| i.spec.node.is_none())
                .all(|i| i.status.reason == "NetworkFull")
    })
    .await;
    let mut ips: Vec<String> = placed
        .iter()
        .filter_map(|i| i.spec.network.as_ref().map(|n| n.ip.clone()))
        .collect();
    ips.sort();
    assert_eq!(ips, ["10.60.0.3", "10.60.0.4", "10.60.0.5", "10.60.0.6"]);
    let waiting = placed.iter().find(|i| i.spec.node.is_none()).unwrap();
    assert!(
        waiting.status.message.contains("no free address"),
        "{}",
        waiting.status.message
    );
    // A placed instance goes: its address is released, and a waiting instance takes it.
    let gone = placed.iter().find(|i| i.spec.node.is_some()).unwrap();
    let freed = gone.spec.network.as_ref().unwrap().ip.clone();
    c.delete::<Instance>(Some("a"), &gone.name).await.unwrap();
    let after = until(
        c,
        "a",
        "the freed address taken by a waiting instance",
        |i| {
            i.iter().any(|i| {
                i.name != gone.name && i.spec.network.as_ref().is_some_and(|n| n.ip == freed)
            })
        },
    )
    .await;
    let mut held: Vec<String> = after
        .iter()
        .filter_map(|i| i.spec.network.as_ref().map(|n| n.ip.clone()))
        .collect();
    let n = held.len();
    held.sort();
    held.dedup();
    assert_eq!((n, held.len()), (4, 4), "an address held twice: {after:#?}");
    assert!(
        !held.contains(&"10.60.0.2".to_owned()),
        "an instance got the VIP"
    );
}

/// Makes node `name` shared by every tenant.
async fn share_node(c: &Client, name: &str) {
    let mut n = c.get::<Node>(None, name).await.unwrap();
    n.spec.shared = true;
    c.update(None, &n).await.unwrap();
}

/// One node `n1` shared by every tenant, with `cpu_millis`, and tenant `tenant`; returns once
/// the scheduler is ready for it ([`scheduler_ready`]).
async fn shared_node_and_tenant(c: &Client, cpu_millis: u64, tenant: &str) {
    add_node(c, "n1", cpu_millis).await;
    share_node(c, "n1").await;
    add_tenant(c, tenant).await;
    scheduler_ready(c, tenant).await;
}

/// Waits until the scheduler has placed an instance of `tenant` (it places nothing before
/// its caches are whole): a service `warm` of one replica that needs no capacity.
async fn scheduler_ready(c: &Client, tenant: &str) {
    c.create(Some(tenant), &service("warm", 1)).await.unwrap();
    until(c, tenant, "the warm-up instance placed", |i| {
        i.iter()
            .any(|i| i.spec.service == "warm" && i.spec.node.is_some())
    })
    .await;
}

/// A watch of `tenant`'s objects of kind `R` from the store's revision now.
async fn watch_from_now<R: hive_api::Resource>(
    c: &Client,
    tenant: &str,
) -> hive_client::WatchStream<R> {
    let rev = c
        .list_page::<R>(Some(tenant), Some(1), None)
        .await
        .unwrap()
        .revision;
    c.watch::<R>(Some(tenant), Some(rev)).await.unwrap()
}

/// The watch's next event, within 10 s (`what` says what the test waits for).
async fn next_event<R: hive_api::Resource>(
    watch: &mut hive_client::WatchStream<R>,
    what: &str,
) -> hive_api::WatchEvent<R> {
    use futures_util::StreamExt;
    tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within 10 s"))
        .expect("watch open")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_scheduler_places_instances_as_they_are_created_and_counts_them() {
    let s = start().await;
    let c = &s.client;
    shared_node_and_tenant(c, 2000, "acme").await;
    let mut watch = watch_from_now::<Instance>(c, "acme").await;
    // Room for two on n1: the third does not fit beside the two reserved before it.
    let mut web = service("web", 3);
    web.spec.template.resources.requests.cpu_millis = Some(1000);
    c.create(Some("acme"), &web).await.unwrap();
    let mut first: std::collections::BTreeMap<String, Option<String>> = Default::default();
    let mut created_at = std::collections::BTreeMap::new();
    let t0 = Instant::now();
    while first.len() < 3 {
        let ev = next_event(&mut watch, "three instances created").await;
        if let Some(i) = ev.object
            && ev.type_ == hive_api::WatchEventType::Added
            && i.spec.service == "web"
        {
            first.insert(i.name.clone(), i.spec.node.clone());
            created_at.insert(i.name.clone(), i.created_at.unwrap());
        }
        assert!(t0.elapsed() < Duration::from_secs(10));
    }
    let on_n1 = first
        .values()
        .filter(|n| n.as_deref() == Some("n1"))
        .count();
    assert_eq!(
        (on_n1, first.len() - on_n1),
        (2, 1),
        "two created on n1, one unplaced: {first:?}"
    );
    let unplaced = first.iter().find(|(_, n)| n.is_none()).unwrap().0.clone();
    let items = until(c, "acme", "the third waits for room", |i| {
        i.iter()
            .any(|i| i.name == unplaced && i.status.reason == "Unschedulable")
    })
    .await;
    let waiting = items.iter().find(|i| i.name == unplaced).unwrap();
    assert_eq!(waiting.spec.node, None);
    assert!(
        waiting.status.message.contains("insufficient cpu"),
        "{}",
        waiting.status.message
    );
    // Each placement is recorded as any other, once the start it records had its writes.
    for (name, node) in &first {
        if node.is_some() {
            let ev = event(c, "acme", "Scheduled", |m| {
                m == format!("instance {name} placed on node n1")
            })
            .await;
            let after = (ev.created_at.unwrap() - created_at[name])
                .to_std()
                .unwrap();
            assert!(
                after >= EVENT_DELAY,
                "{name}: recorded {after:?} after its create"
            );
        }
    }
}

/// A service's changed status waits [`STATUS_DELAY`] before it is written, with what
/// changed meanwhile: its first status, written after its instances were created, counts
/// them all, and comes no sooner than the delay after the service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_services_status_is_written_once_its_changes_had_time_to_settle() {
    let s = start().await;
    let c = &s.client;
    add_tenant(c, "acme").await;
    let mut watch = watch_from_now::<Service>(c, "acme").await;
    c.create(Some("acme"), &service("web", 3)).await.unwrap();
    let mut added = None;
    let status = loop {
        let ev = next_event(&mut watch, "a status").await;
        let Some(svc) = ev.object else { continue };
        match ev.type_ {
            hive_api::WatchEventType::Added => added = Some(Instant::now()),
            hive_api::WatchEventType::Modified if svc.status.replicas > 0 => {
                break (added.expect("added first").elapsed(), svc.status);
            }
            _ => {}
        }
    };
    assert_eq!(status.1.replicas, 3, "{status:?}");
    // (Less a margin for the watch's delivery of the create.)
    assert!(
        status.0 >= STATUS_DELAY - Duration::from_millis(10),
        "written {:?} after the service was seen",
        status.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_refused_on_its_reserved_node_is_created_unplaced_and_says_why() {
    let s = start().await;
    let c = &s.client;
    // Exactly room for six. The creates on their reserved node that get no address are
    // made again unplaced, and the scheduler's own pass says why they wait; were their
    // reservations still counted, they would wait as unschedulable instead.
    shared_node_and_tenant(c, 6000, "a").await;
    // A /29: the VIP and four instances.
    add_network(c, "a", "tiny", "10.61.0.0/29").await;
    let mut web = service("web", 6);
    web.spec.template.network = Some("tiny".into());
    web.spec.template.resources.requests.cpu_millis = Some(1000);
    c.create(Some("a"), &web).await.unwrap();
    let items = until(c, "a", "4 placed, 2 waiting for an address", |i| {
        let web: Vec<&Instance> = i.iter().filter(|i| i.spec.service == "web").collect();
        web.len() == 6
            && web.iter().filter(|i| i.spec.node.is_some()).count() == 4
            && web
                .iter()
                .filter(|i| i.spec.node.is_none())
                .all(|i| i.status.reason == "NetworkFull")
    })
    .await;
    assert!(
        items.iter().all(|i| i.status.reason != "Unschedulable"),
        "{items:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_reserved_for_a_create_that_fails_is_given_back() {
    use std::sync::atomic::Ordering;
    let s = common::launch().await;
    let c = s.client.clone();
    // The service controller's creates go through a proxy that refuses the armed number.
    let (flaky, failures) = flaky_proxy(c.base().to_owned(), 0, instance_create);
    let scheduler = Scheduler::new(c.clone());
    let services = Client::new(&flaky, c.token().map(str::to_owned)).unwrap();
    tokio::spawn(
        ServiceController::new(services)
            .with_placer(scheduler.placer())
            .run(),
    );
    tokio::spawn(scheduler.run());
    shared_node_and_tenant(&c, 2000, "a").await;
    // The first create on its reserved node fails, and so does the unplaced one after it:
    // the reconcile is retried. Room for exactly two: a reservation kept from the failed
    // try would leave the second instance unschedulable.
    failures.store(2, Ordering::SeqCst);
    let mut web = service("web", 2);
    web.spec.template.resources.requests.cpu_millis = Some(1000);
    c.create(Some("a"), &web).await.unwrap();
    let items = until(&c, "a", "both placed", |i| {
        i.iter()
            .filter(|i| i.spec.service == "web" && i.spec.node.as_deref() == Some("n1"))
            .count()
            == 2
    })
    .await;
    assert_eq!(
        failures.load(Ordering::SeqCst),
        0,
        "both failures were used"
    );
    assert!(
        items.iter().all(|i| i.status.reason.is_empty()),
        "{items:#?}"
    );
}

#[tokio::test]
async fn guaranteed_bandwidth_beyond_the_links_leaves_instances_pending() {
    let s = start().await;
    let c = &s.client;
    add_node(c, "n1", 64_000).await;
    add_tenant(c, "a").await;
    // Two 4 Gbit/s guarantees fit a 10 Gbit/s link, a third does not.
    let mut video = service("video", 3);
    video.spec.template.bandwidth = Some(hive_api::Bandwidth {
        guaranteed_bps: Some(4_000_000_000),
        max_bps: Some(8_000_000_000),
        pps: None,
    });
    c.create(Some("a"), &video).await.unwrap();
    let all = until(c, "a", "2 placed, 1 waiting on bandwidth", |i| {
        i.len() == 3
            && i.iter().filter(|i| i.spec.node.is_some()).count() == 2
            && i.iter().any(|i| {
                i.status.reason == "Unschedulable"
                    && i.status.message == "0/1 nodes available: 1 insufficient network bandwidth"
            })
    })
    .await;
    assert_eq!(all.len(), 3);
}

// ---- Rolling and canary updates -------------------------------------------------------
//
// A fake agent stands in for the node: it marks instances placed on a node running and
// ready (while its gate is open), and an image named `…/bad` fails to pull, as a real
// agent reports it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use hive_api::{
    Amount, CanaryUpdate, ErrorCode, EventType, InstancePhase, RollingUpdate, RolloutAction,
    RolloutPhase, Strategy,
};

struct FakeAgent {
    open: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn fake_agent(c: &Client, tenant: &str) -> FakeAgent {
    let open = Arc::new(AtomicBool::new(true));
    let (c, tenant, gate) = (c.clone(), tenant.to_owned(), open.clone());
    let task = tokio::spawn(async move {
        loop {
            if let Ok(list) = c.list::<Instance>(Some(&tenant)).await {
                for mut i in list.items {
                    if i.spec.node.is_none() || i.status.ready {
                        continue;
                    }
                    if i.spec.template.image.ends_with("/bad") {
                        if i.status.reason.is_empty() {
                            i.status.reason = "ImagePullFailed".into();
                            i.status.message = "manifest unknown".into();
                            let _ = c.update_status(Some(&tenant), &i).await;
                        }
                    } else if gate.load(Ordering::SeqCst) {
                        i.status.phase = InstancePhase::Running;
                        i.status.ready = true;
                        i.status.reason.clear();
                        i.status.message.clear();
                        let _ = c.update_status(Some(&tenant), &i).await;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    });
    FakeAgent { open, task }
}

/// A tenant `acme` with one roomy node whose lease is kept, and a fake agent.
async fn rollout_setup(c: &Client) -> (FakeAgent, tokio::task::JoinHandle<()>) {
    add_tenant(c, "acme").await;
    add_node(c, "n1", 64_000).await;
    let lease = keep_lease(c, "n1");
    (fake_agent(c, "acme"), lease)
}

fn versioned(name: &str, replicas: u32, image: &str, strategy: Strategy) -> Service {
    let mut s = service(name, replicas);
    s.spec.template.image = image.into();
    s.spec.strategy = strategy;
    s
}

/// Read, change the image, write under the read revision; again when the controller's
/// status write came in between (as `hive service update` does).
async fn set_image(c: &Client, svc: &str, image: &str) -> Service {
    for _ in 0..10 {
        let mut s = c.get::<Service>(Some("acme"), svc).await.unwrap();
        s.spec.template.image = image.into();
        match c.update(Some("acme"), &s).await {
            Ok(s) => return s,
            Err(e) if e.code() == Some(ErrorCode::Conflict) => continue,
            Err(e) => panic!("update {svc}: {e}"),
        }
    }
    panic!("{svc} kept changing")
}

/// Waits until the service's rollout is in `phase` with `n` instances all of `image`
/// (`None`: any mix) and returns the service.
async fn phase(c: &Client, svc: &str, want: RolloutPhase) -> Service {
    let t0 = Instant::now();
    loop {
        let s = c.get::<Service>(Some("acme"), svc).await.unwrap();
        if s.status.rollout.phase == want {
            return s;
        }
        if t0.elapsed() >= Duration::from_secs(15) {
            // What each instance says, to tell a binding never written from a status never
            // counted (seen once under CI load: 4 of 4 updated, 3 ready, for 15 s).
            let instances: Vec<String> = of_service(c, svc)
                .await
                .iter()
                .map(|i| {
                    format!(
                        "{} rev {} node {:?} {:?} ready {} {:?} {:?}",
                        i.name,
                        i.revision,
                        i.spec.node,
                        i.status.phase,
                        i.status.ready,
                        i.status.reason,
                        i.spec.template.image
                    )
                })
                .collect();
            panic!(
                "{svc}: phase {:?}, want {want:?}: {:#?}\ninstances:\n{}",
                s.status.rollout.phase,
                s.status,
                instances.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn of_service(c: &Client, svc: &str) -> Vec<Instance> {
    c.list::<Instance>(Some("acme"))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|i| i.spec.service == svc)
        .collect()
}

fn images(items: &[Instance]) -> Vec<String> {
    let mut v: Vec<String> = items
        .iter()
        .map(|i| i.spec.template.image.clone())
        .collect();
    v.sort();
    v
}

async fn reasons(c: &Client) -> Vec<(EventType, String, String)> {
    c.list::<hive_api::Event>(Some("acme"))
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|e| (e.type_, e.reason, e.message))
        .collect()
}

/// Watches `svc` every 10 ms once armed: never fewer than `min_ready` ready instances,
/// never more than `max_total`. Returns the lowest ready count and highest total seen.
fn monitor(
    c: &Client,
    svc: &str,
    min_ready: usize,
    max_total: usize,
) -> tokio::task::JoinHandle<(usize, usize)> {
    let (c, svc) = (c.clone(), svc.to_owned());
    tokio::spawn(async move {
        let (mut low, mut high) = (usize::MAX, 0);
        for _ in 0..400 {
            let items = of_service(&c, &svc).await;
            let ready = items.iter().filter(|i| i.status.ready).count();
            low = low.min(ready);
            high = high.max(items.len());
            assert!(ready >= min_ready, "{svc}: {ready} ready: {items:#?}");
            assert!(items.len() <= max_total, "{svc}: {} instances", items.len());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        (low, high)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_update_moves_only_as_new_instances_become_ready() {
    let s = start().await;
    let c = &s.client;
    let (agent, lease) = rollout_setup(c).await;
    let strategy = Strategy::Rolling(RollingUpdate {
        max_surge: Amount::Count(1),
        max_unavailable: Amount::Percent("25%".into()),
    });
    c.create(Some("acme"), &versioned("web", 4, "reg/web:v1", strategy))
        .await
        .unwrap();
    let v1 = phase(c, "web", RolloutPhase::Complete).await;
    assert_eq!(v1.status.template_revision, 1);
    assert_eq!(v1.status.ready_replicas, 4);

    // New instances never become ready while the gate is shut: one old one goes (25% of 4
    // may be unavailable), two new ones wait (4 + 1 surge), three old ones serve.
    let guard = monitor(c, "web", 3, 5);
    agent.open.store(false, Ordering::SeqCst);
    let v2 = set_image(c, "web", "reg/web:v2").await;
    assert_eq!(v2.status.template_revision, 2);
    assert_eq!(v2.status.history.len(), 2);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let items = of_service(c, "web").await;
    assert_eq!(
        images(&items),
        [
            "reg/web:v1",
            "reg/web:v1",
            "reg/web:v1",
            "reg/web:v2",
            "reg/web:v2"
        ]
    );
    let s2 = c.get::<Service>(Some("acme"), "web").await.unwrap();
    assert_eq!(s2.status.rollout.phase, RolloutPhase::Progressing);
    assert_eq!(s2.status.updated_replicas, 2);
    assert_eq!(s2.status.ready_replicas, 3);

    // Ready: the rollout completes, every instance of v2 labelled revision 2.
    agent.open.store(true, Ordering::SeqCst);
    let done = phase(c, "web", RolloutPhase::Complete).await;
    assert_eq!(done.status.updated_replicas, 4);
    let items = of_service(c, "web").await;
    assert_eq!(images(&items), vec!["reg/web:v2"; 4]);
    assert!(items.iter().all(|i| i.labels["hive.dev/revision"] == "2"));
    let (low, high) = guard.await.unwrap();
    assert_eq!((low, high), (3, 5));
    let ev = reasons(c).await;
    assert!(
        ev.iter()
            .any(|e| e.1 == "RolloutStep" && e.2.contains("revision 2"))
    );
    assert!(ev.iter().any(|e| e.1 == "RolloutComplete"));
    lease.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_that_never_starts_stalls_the_rollout_and_undo_restores() {
    let s = start().await;
    let c = &s.client;
    let (_agent, lease) = rollout_setup(c).await;
    c.create(
        Some("acme"),
        &versioned("web", 3, "reg/web:v1", Strategy::default()),
    )
    .await
    .unwrap();
    phase(c, "web", RolloutPhase::Complete).await;
    let before: Vec<String> = of_service(c, "web")
        .await
        .into_iter()
        .map(|i| i.name)
        .collect();

    // Default 25%/25% of 3: surge 1, none unavailable: one bad instance, three old serve.
    let guard = monitor(c, "web", 3, 4);
    set_image(c, "web", "reg/bad").await;
    let stalled = phase(c, "web", RolloutPhase::Stalled).await;
    assert!(
        stalled.status.rollout.message.contains("ImagePullFailed"),
        "{}",
        stalled.status.rollout.message
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let items = of_service(c, "web").await;
    assert_eq!(
        images(&items),
        ["reg/bad", "reg/web:v1", "reg/web:v1", "reg/web:v1"]
    );
    assert!(
        reasons(c)
            .await
            .iter()
            .any(|e| e.0 == EventType::Warning && e.1 == "RolloutStalled")
    );

    // Undo: revision 3 is revision 1's template; the old instances are current again and
    // stay, the bad one goes.
    let undone = c
        .rollout("acme", "web", &RolloutAction::Undo { to_revision: None })
        .await
        .unwrap();
    assert_eq!(undone.status.template_revision, 3);
    assert_eq!(undone.spec.template.image, "reg/web:v1");
    phase(c, "web", RolloutPhase::Complete).await;
    let mut after: Vec<String> = of_service(c, "web")
        .await
        .into_iter()
        .map(|i| i.name)
        .collect();
    after.sort();
    let mut before = before;
    before.sort();
    assert_eq!(after, before);
    guard.await.unwrap();
    // Nothing to roll back or promote now.
    for a in [RolloutAction::Rollback, RolloutAction::Promote] {
        let e = c.rollout("acme", "web", &a).await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::Conflict), "{a:?}: {e}");
    }
    lease.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_holds_then_promote_completes_and_rollback_restores() {
    let s = start().await;
    let c = &s.client;
    let (_agent, lease) = rollout_setup(c).await;
    let canary = Strategy::Canary(CanaryUpdate {
        step: Amount::Percent("25%".into()),
    });
    c.create(Some("acme"), &versioned("web", 4, "reg/web:v1", canary))
        .await
        .unwrap();
    phase(c, "web", RolloutPhase::Complete).await;

    set_image(c, "web", "reg/web:v2").await;
    let paused = phase(c, "web", RolloutPhase::Paused).await;
    assert_eq!(paused.status.updated_replicas, 1);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let items = of_service(c, "web").await;
    assert_eq!(
        images(&items),
        ["reg/web:v1", "reg/web:v1", "reg/web:v1", "reg/web:v2"]
    );
    assert!(reasons(c).await.iter().any(|e| e.1 == "RolloutPaused"));

    let promoted = c
        .rollout("acme", "web", &RolloutAction::Promote)
        .await
        .unwrap();
    assert!(promoted.status.rollout.promoted);
    phase(c, "web", RolloutPhase::Complete).await;
    assert_eq!(images(&of_service(c, "web").await), vec!["reg/web:v2"; 4]);

    // A second canary, rolled back: the three v2 instances that kept serving are current
    // again, the canary goes.
    set_image(c, "web", "reg/web:v3").await;
    phase(c, "web", RolloutPhase::Paused).await;
    let stable: Vec<String> = of_service(c, "web")
        .await
        .into_iter()
        .filter(|i| i.spec.template.image == "reg/web:v2")
        .map(|i| i.name)
        .collect();
    assert_eq!(stable.len(), 3);
    let back = c
        .rollout("acme", "web", &RolloutAction::Rollback)
        .await
        .unwrap();
    assert_eq!(back.spec.template.image, "reg/web:v2");
    assert_eq!(back.status.template_revision, 4);
    let done = phase(c, "web", RolloutPhase::Complete).await;
    assert_eq!(
        done.status.history.last().unwrap().cause,
        "rollback of revision 3 to 2 by admin"
    );
    let items = of_service(c, "web").await;
    assert_eq!(images(&items), vec!["reg/web:v2"; 4]);
    for n in &stable {
        assert!(items.iter().any(|i| &i.name == n), "{n} was replaced");
    }
    let ev = reasons(c).await;
    assert!(ev.iter().any(|e| e.1 == "RolloutPromoted"));
    assert!(ev.iter().any(|e| e.1 == "RolledBack"));
    lease.abort();
}

#[tokio::test]
async fn concurrent_updates_conflict_and_the_history_is_bounded() {
    let s = start().await;
    let c = &s.client;
    add_tenant(c, "acme").await;
    c.create(Some("acme"), &service("web", 0)).await.unwrap();

    // Two writers from the same read: one wins, the other gets 409 and changes nothing.
    // The read comes after the controller's own status write, which would beat both.
    let read = phase(c, "web", RolloutPhase::Complete).await;
    let (mut a, mut b) = (read.clone(), read.clone());
    a.spec.template.image = "reg/a".into();
    b.spec.template.image = "reg/b".into();
    let (ra, rb) = tokio::join!(c.update(Some("acme"), &a), c.update(Some("acme"), &b));
    let (won, lost) = match (ra, rb) {
        (Ok(w), Err(e)) | (Err(e), Ok(w)) => (w, e),
        other => panic!("want one success and one conflict: {other:?}"),
    };
    assert_eq!(lost.code(), Some(ErrorCode::Conflict), "{lost}");
    let now = c.get::<Service>(Some("acme"), "web").await.unwrap();
    assert_eq!(now.spec.template.image, won.spec.template.image);
    assert_eq!(now.status.template_revision, 2);
    let kept: Vec<u64> = now.status.history.iter().map(|h| h.revision).collect();
    assert_eq!(kept, [1, 2]);

    // At most ten revisions kept; undo to a dropped one is refused naming the field.
    for i in 0..12 {
        set_image(c, "web", &format!("reg/web:v{i}")).await;
    }
    let now = c.get::<Service>(Some("acme"), "web").await.unwrap();
    assert_eq!(now.status.template_revision, 14);
    let kept: Vec<u64> = now.status.history.iter().map(|h| h.revision).collect();
    assert_eq!(kept, (5..=14).collect::<Vec<_>>());
    let e = c
        .rollout(
            "acme",
            "web",
            &RolloutAction::Undo {
                to_revision: Some(2),
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Invalid), "{e}");
    assert!(e.to_string().contains("to_revision"), "{e}");
    let undone = c
        .rollout(
            "acme",
            "web",
            &RolloutAction::Undo {
                to_revision: Some(7),
            },
        )
        .await
        .unwrap();
    assert_eq!(undone.status.template_revision, 15);
    assert_eq!(undone.spec.template.image, "reg/web:v4");

    // A controller's status write cannot rewrite the history or the revision.
    let mut forged = undone.clone();
    forged.revision = 0;
    forged.status.history.clear();
    forged.status.template_revision = 99;
    let written = c.update_status(Some("acme"), &forged).await.unwrap();
    assert_eq!(written.status.template_revision, 15);
    assert_eq!(written.status.history.len(), 10);

    // Strategies are validated with the field named.
    let mut bad = c.get::<Service>(Some("acme"), "web").await.unwrap();
    bad.spec.strategy = Strategy::Rolling(RollingUpdate {
        max_surge: Amount::Count(0),
        max_unavailable: Amount::Percent("0%".into()),
    });
    let e = c.update(Some("acme"), &bad).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Invalid));
    assert!(e.to_string().contains("spec.strategy.rolling"), "{e}");
    bad.spec.strategy = Strategy::Canary(CanaryUpdate {
        step: Amount::Percent("150%".into()),
    });
    let e = c.update(Some("acme"), &bad).await.unwrap_err();
    assert!(e.to_string().contains("spec.strategy.canary.step"), "{e}");
}

/// Waits until `tenant` has an Event with `reason` whose message satisfies `matches`.
async fn event(c: &Client, tenant: &str, reason: &str, matches: impl Fn(&str) -> bool) -> Event {
    let t0 = Instant::now();
    loop {
        let items = c.list::<Event>(Some(tenant)).await.unwrap().items;
        if let Some(e) = items
            .iter()
            .find(|e| e.reason == reason && matches(&e.message))
        {
            return e.clone();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{tenant}: no {reason} event: {items:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the scheduler has marked `node` as taken from the pool by `tenant`. The
/// node's binding is its own write, after the instance's (under the node's revision, which
/// lease renewals move): it lands within a few tries.
async fn bound_node(c: &Client, node: &str, tenant: &str) -> Node {
    let t0 = Instant::now();
    loop {
        let n = c.get::<Node>(None, node).await.unwrap();
        if n.labels.get(POOL_BOUND_LABEL).map(String::as_str) == Some(tenant) {
            return n;
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "{n:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_taken_from_the_pool_goes_back_after_the_grace_but_an_operator_bound_one_stays() {
    let s = start_with(|c| Scheduler::new(c).with_pool_grace(Duration::from_secs(1))).await;
    let c = &s.client;
    add_node(c, "pool1", 4000).await;
    add_node(c, "mine", 4000).await;
    for t in ["a", "b", "c"] {
        add_tenant(c, t).await;
    }
    // The operator binds "mine" to a.
    let mut mine = c.get::<Node>(None, "mine").await.unwrap();
    mine.spec.tenant = Some("a".into());
    c.update(None, &mine).await.unwrap();

    c.create(Some("a"), &service("web", 1)).await.unwrap();
    c.create(Some("b"), &service("db", 1)).await.unwrap();
    until(c, "a", "placed on its own node", |i| {
        i.len() == 1 && i[0].spec.node.as_deref() == Some("mine")
    })
    .await;
    until(c, "b", "placed on the pool node", |i| {
        i.len() == 1 && i[0].spec.node.as_deref() == Some("pool1")
    })
    .await;
    // The node's binding is the scheduler's next write, after the instance's.
    let pool1 = bound_node(c, "pool1", "b").await;
    assert_eq!(pool1.spec.tenant.as_deref(), Some("b"));
    assert!(
        !c.get::<Node>(None, "mine")
            .await
            .unwrap()
            .labels
            .contains_key(POOL_BOUND_LABEL)
    );

    // c waits: the only pool node is b's.
    c.create(Some("c"), &service("x", 1)).await.unwrap();
    until(c, "c", "unschedulable", |i| {
        i.len() == 1 && i[0].status.reason == "Unschedulable"
    })
    .await;

    // Both tenants' nodes empty: b's goes back after the grace (and c gets it), a's stays.
    let emptied = Instant::now();
    c.delete::<Service>(Some("a"), "web").await.unwrap();
    c.delete::<Service>(Some("b"), "db").await.unwrap();
    until(c, "b", "gone", |i| i.is_empty()).await;
    until(c, "a", "gone", |i| i.is_empty()).await;
    let returned = event(c, "b", "NodeReturned", |m| m.contains("pool1")).await;
    let after = emptied.elapsed();
    assert!(
        after >= Duration::from_secs(1) && after < Duration::from_secs(6),
        "returned {after:?} after the node emptied (grace 1 s, checked every 2 s)"
    );
    assert_eq!(returned.object.name, "pool1");
    until(c, "c", "placed on the returned node", |i| {
        i.len() == 1 && i[0].spec.node.as_deref() == Some("pool1")
    })
    .await;
    bound_node(c, "pool1", "c").await;
    // Well past the grace, the operator's node is still a's.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mine = c.get::<Node>(None, "mine").await.unwrap();
    assert_eq!(mine.spec.tenant.as_deref(), Some("a"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unschedulable_instance_gets_one_failed_scheduling_event_with_reason_counts() {
    let s = start().await;
    let c = &s.client;
    add_node(c, "theirs", 4000).await;
    add_node(c, "small", 100).await;
    add_tenant(c, "z").await;
    add_tenant(c, "a").await;
    let mut theirs = c.get::<Node>(None, "theirs").await.unwrap();
    theirs.spec.tenant = Some("z".into());
    c.update(None, &theirs).await.unwrap();

    let mut big = service("big", 1);
    big.spec.template.resources.requests.cpu_millis = Some(500);
    c.create(Some("a"), &big).await.unwrap();
    let failed = event(c, "a", "FailedScheduling", |_| true).await;
    assert_eq!(
        failed.message,
        "Unschedulable: 0/2 nodes available: 1 bound to another tenant, 1 insufficient cpu"
    );
    assert_eq!(failed.type_, hive_api::EventType::Warning);
    assert!(failed.object.name.starts_with("big-"));
    // Retried on every 2 s tick with the same outcome: still one Event.
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let events = c.list::<Event>(Some("a")).await.unwrap().items;
    assert_eq!(
        events
            .iter()
            .filter(|e| e.reason == "FailedScheduling")
            .count(),
        1,
        "{events:#?}"
    );

    // A node that fits: placed, with a Scheduled Event.
    add_node(c, "roomy", 4000).await;
    let placed = event(c, "a", "Scheduled", |_| true).await;
    assert_eq!(placed.object.name, failed.object.name);
    assert!(
        placed.message.contains("on node roomy"),
        "{}",
        placed.message
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bindings_written_in_batches_fill_pool_nodes_exactly_to_capacity() {
    let s = start().await;
    let c = &s.client;
    for i in 0..12 {
        add_node(c, &format!("p{i:02}"), 1000).await;
    }
    for t in ["a", "b", "c"] {
        add_tenant(c, t).await;
    }
    // 100 replicas of 100m: more than one batch of bindings, exactly 10 nodes' worth.
    let mut web = service("web", 100);
    web.spec.template.resources.requests.cpu_millis = Some(100);
    c.create(Some("a"), &web).await.unwrap();
    let a = until(c, "a", "100 placed", |i| {
        i.len() == 100 && i.iter().all(|i| i.spec.node.is_some())
    })
    .await;
    let mut per_node = std::collections::BTreeMap::<String, u32>::new();
    for i in &a {
        *per_node.entry(i.spec.node.clone().unwrap()).or_default() += 1;
    }
    assert_eq!(per_node.len(), 10, "{per_node:?}");
    assert!(per_node.values().all(|&n| n == 10), "{per_node:?}");
    for n in per_node.keys() {
        let node = bound_node(c, n, "a").await;
        assert_eq!(node.spec.tenant.as_deref(), Some("a"), "{n}");
    }
    // The two nodes left go to b; c finds none.
    let mut db = service("db", 20);
    db.spec.template.resources.requests.cpu_millis = Some(100);
    c.create(Some("b"), &db).await.unwrap();
    let b = until(c, "b", "20 placed", |i| {
        i.len() == 20 && i.iter().all(|i| i.spec.node.is_some())
    })
    .await;
    let b_nodes: std::collections::BTreeSet<String> =
        b.into_iter().filter_map(|i| i.spec.node).collect();
    assert_eq!(b_nodes.len(), 2);
    assert!(b_nodes.iter().all(|n| !per_node.contains_key(n)));
    c.create(Some("c"), &service("x", 1)).await.unwrap();
    until(c, "c", "unschedulable", |i| {
        i.len() == 1 && i[0].status.message == "0/12 nodes available: 12 bound to another tenant"
    })
    .await;
}
