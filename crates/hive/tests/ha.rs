//! Three `hive server` processes on a 3-member etcd (the real binaries, on loopback), one
//! simulated node (an API object whose lease the test renews): writes go through all three
//! servers while the etcd leader is killed and then the server leading the controllers;
//! every acknowledged write is there afterwards, no service has more instances than it
//! asked for (never two controllers at once), and the scheduler of the new leader places.
//! The same again with two of the servers' clocks skewed by libfaketime (an hour ahead and
//! fast, an hour behind and slow), killing the leader twice so that each server leads.

#[path = "../../hive-store/tests/support/mod.rs"]
mod support;

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{HIVE, Up, start_until};
use futures_util::StreamExt;
use hive_api::{
    ContainerSpec, Instance, Node, NodeCapacity, NodeStatus, Service, ServiceSpec, Tenant,
};
use hive_client::Client;
use sha2::Digest as _;
use support::EtcdCluster;

/// A server with its own data dir and the registry directory all servers share.
fn server(etcd_url: &str, data: &Path, registry: &Path) -> Up {
    start_until(
        server_command(etcd_url, data, registry),
        "hive server: API at ",
    )
}

fn server_command(etcd_url: &str, data: &Path, registry: &Path) -> Command {
    let mut cmd = Command::new(HIVE);
    cmd.args(["server", "--store", etcd_url, "--listen", "127.0.0.1:0"])
        .args(["--rate-limit", "0", "--node-grace-secs", "8", "--data-dir"])
        .arg(data)
        .arg("--registry-dir")
        .arg(registry);
    cmd
}

/// Debian's libfaketime (package `faketime`).
const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// `hive server` with libfaketime preloaded and `FAKETIME=faketime`: its wall clock and its
/// monotonic clock (libfaketime fakes both by default) are offset and run at another rate.
fn skewed_server(etcd_url: &str, data: &Path, registry: &Path, faketime: &str) -> Up {
    assert!(
        Path::new(LIBFAKETIME).is_file(),
        "this test needs libfaketime at {LIBFAKETIME} (Debian: apt-get install faketime, or run \
         scripts/deps.sh)"
    );
    let mut cmd = server_command(etcd_url, data, registry);
    cmd.env("LD_PRELOAD", LIBFAKETIME)
        .env("FAKETIME", faketime)
        .env_remove("FAKETIME_DONT_FAKE_MONOTONIC");
    start_until(cmd, "hive server: API at ")
}

/// `etcd://` and the members' `host:port`s, as `--store` takes them.
fn etcd_url(etcd: &EtcdCluster) -> String {
    format!(
        "etcd://{}",
        etcd.endpoints()
            .iter()
            .map(|e| e.trim_start_matches("http://").to_owned())
            .collect::<Vec<_>>()
            .join(",")
    )
}

/// Tenant `acme` and node `sim`, shared and ready, its lease renewed (with the test's clock)
/// through each server in turn until `stop`.
async fn tenant_and_node(clients: &[Client], stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<()> {
    let c0 = &clients[0];
    c0.create(
        None,
        &Tenant {
            name: "acme".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let node = c0
        .create(
            None,
            &Node {
                name: "sim".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let cap = NodeCapacity {
        cpu_millis: 64_000,
        memory_bytes: 256 << 30,
        network_bps: 10_000_000_000,
    };
    let mut n = node;
    n.status = NodeStatus {
        capacity: cap.clone(),
        allocatable: cap,
        ready: true,
        lease_renewed_at: Some(chrono::Utc::now()),
        ..Default::default()
    };
    n.spec.shared = true;
    n.revision = 0;
    c0.update(None, &n).await.unwrap();
    c0.update_status(None, &n).await.unwrap();
    let clients = clients.to_vec();
    tokio::spawn(async move {
        let mut i = 0;
        while !stop.load(Ordering::Relaxed) {
            let c = &clients[i % clients.len()];
            if let Ok(mut n) = c.get::<Node>(None, "sim").await {
                n.status.lease_renewed_at = Some(chrono::Utc::now());
                n.status.ready = true;
                n.revision = 0;
                let _ = c.update_status(None, &n).await;
            }
            i += 1;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
}

/// Waits until `svc` has `n` instances, all placed on `sim`; how long that took.
async fn placed(c: &Client, svc: &str, n: usize) -> Duration {
    let t0 = Instant::now();
    loop {
        let is = instances(c, svc).await;
        if is.len() == n && is.iter().all(|i| i.spec.node.as_deref() == Some("sim")) {
            return t0.elapsed();
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "{svc}: {is:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Creates services `w-0`, `w-1`… through the servers in turn every 20 ms until `stop`; the
/// names of those acknowledged go into `acked`.
fn write_load(
    clients: &[Client],
    stop: Arc<AtomicBool>,
    acked: Arc<std::sync::Mutex<Vec<String>>>,
) -> tokio::task::JoinHandle<()> {
    let clients = clients.to_vec();
    tokio::spawn(async move {
        let mut i = 0usize;
        while !stop.load(Ordering::Relaxed) {
            let name = format!("w-{i}");
            if clients[i % clients.len()]
                .create(Some("acme"), &service(&name, 0))
                .await
                .is_ok()
            {
                acked.lock().unwrap().push(name);
            }
            i += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
}

/// The servers share one registry directory: a blob uploaded in chunks whose requests go to
/// each server in turn (as through a load balancer), and an image pushed through one server,
/// are pulled through the others.
async fn one_registry_behind_three_servers(urls: &[String], token: &str) {
    let http = hive_client::http().unwrap();
    let send = |method: reqwest::Method, url: String, body: Vec<u8>, range: Option<String>| {
        let mut r = http.request(method, url).bearer_auth(token).body(body);
        if let Some(range) = range {
            r = r.header("content-range", range);
        }
        async move { r.send().await.unwrap() }
    };
    let sha = |b: &[u8]| format!("sha256:{}", hex::encode(sha2::Sha256::digest(b)));
    let layer: Vec<u8> = (0..300_000u32).flat_map(|i| i.to_le_bytes()).collect();
    let r = send(
        reqwest::Method::POST,
        format!("{}/v2/acme/shared/blobs/uploads/", urls[0]),
        vec![],
        None,
    )
    .await;
    assert_eq!(r.status(), 202);
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    let chunks: Vec<&[u8]> = layer.chunks(400_000).collect();
    let mut at = 0;
    for (i, chunk) in chunks.iter().enumerate() {
        let range = format!("{at}-{}", at + chunk.len() - 1);
        let url = format!("{}{location}", urls[i % 3]);
        let r = send(reqwest::Method::PATCH, url, chunk.to_vec(), Some(range)).await;
        assert_eq!(r.status(), 202, "chunk {i} through server {}", i % 3);
        at += chunk.len();
    }
    let layer_digest = sha(&layer);
    let url = format!("{}{location}?digest={layer_digest}", urls[chunks.len() % 3]);
    let r = send(reqwest::Method::PUT, url, vec![], None).await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let config = br#"{"architecture":"amd64","os":"linux"}"#.to_vec();
    let config_digest = sha(&config);
    let url = format!(
        "{}/v2/acme/shared/blobs/uploads/?digest={config_digest}",
        urls[1]
    );
    assert_eq!(
        send(reqwest::Method::POST, url, config.clone(), None)
            .await
            .status(),
        201
    );
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": layer_digest, "size": layer.len()}]}))
    .unwrap();
    let r = http
        .put(format!("{}/v2/acme/shared/manifests/v1", urls[2]))
        .bearer_auth(token)
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(manifest.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    // A registry token (the Docker token flow) from one server is good on the others: they
    // share the signing key kept in the registry directory.
    let r = http
        .get(format!(
            "{}/v2/token?service=hive-registry&scope=repository:acme/shared:pull",
            urls[0]
        ))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    let registry_token = v["token"].as_str().unwrap().to_owned();
    for url in &urls[1..] {
        let r = http
            .get(format!("{url}/v2/acme/shared/manifests/v1"))
            .bearer_auth(&registry_token)
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            200,
            "{url}: the registry token from another server"
        );
    }
    for url in urls {
        let get = |path: String| {
            let r = http.get(format!("{url}{path}")).bearer_auth(token);
            async move { r.send().await.unwrap().bytes().await.unwrap() }
        };
        assert_eq!(
            get("/v2/acme/shared/manifests/v1".into()).await,
            manifest,
            "{url}"
        );
        let blob = get(format!("/v2/acme/shared/blobs/{layer_digest}")).await;
        assert!(blob == layer, "{url}: the layer differs");
    }
}

/// The holder of the current term, from the term key in etcd.
async fn term_holder(store: &hive_store::EtcdStore) -> String {
    let term = hive_store::Store::get(store, hive_server::leader::LEADER_KEY)
        .await
        .unwrap()
        .kv
        .expect("a leader");
    let holder: serde_json::Value = serde_json::from_slice(&term.value).unwrap();
    holder["holder"].as_str().unwrap().to_owned()
}

/// The holder of the current term once it is steady: the heartbeat names the same holder
/// as the term and has advanced under it (so the server named is leading now, not one that
/// has already stepped down during an etcd failover and whose death would cost nothing).
async fn stable_leader(store: &hive_store::EtcdStore) -> String {
    let beat = || async {
        let kv = hive_store::Store::get(store, hive_server::leader::BEAT_KEY)
            .await
            .ok()?
            .kv?;
        let v: serde_json::Value = serde_json::from_slice(&kv.value).ok()?;
        Some((v["holder"].as_str()?.to_owned(), kv.mod_revision))
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        assert!(Instant::now() < deadline, "no steady leader within 20 s");
        let first = beat().await;
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let (Some((h1, r1)), Some((h2, r2))) = (first, beat().await) else {
            continue;
        };
        if h1 == h2 && r2 > r1 && term_holder(store).await == h2 {
            return h2;
        }
    }
}

/// Which of `servers` the holder id (`URL-random`) names.
fn server_of(holder: &str, urls: &[String]) -> usize {
    urls.iter()
        .position(|u| holder.starts_with(&format!("{u}-")))
        .unwrap_or_else(|| panic!("{holder} is none of {urls:?}"))
}

/// The names of tenant `acme`'s services, listed through `c`.
async fn service_names(c: &Client) -> impl Iterator<Item = String> {
    c.list::<Service>(Some("acme"))
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|s| s.name)
}

/// Every acknowledged write is listed through `c`: at once for its own session, and for the
/// writes other clients made through other servers within the servers' staleness bound (5 s;
/// reads are consistent per session, not across sessions).
async fn assert_none_lost(c: &Client, acked: &[String]) {
    assert!(acked.len() > 50, "only {} writes acknowledged", acked.len());
    let t0 = Instant::now();
    loop {
        let names: std::collections::HashSet<String> = service_names(c).await.collect();
        let missing: Vec<&String> = acked.iter().filter(|n| !names.contains(*n)).collect();
        if missing.is_empty() {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(6),
            "acknowledged but missing: {missing:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn service(name: &str, replicas: u32) -> Service {
    Service {
        name: name.into(),
        spec: ServiceSpec {
            replicas,
            template: ContainerSpec {
                image: "registry.invalid/app:1".into(),
                ..Default::default()
            },
            ..Default::default()
        },
        ..Default::default()
    }
}

async fn instances(c: &Client, service: &str) -> Vec<Instance> {
    c.list::<Instance>(Some("acme"))
        .await
        .map(|l| l.items)
        .unwrap_or_default()
        .into_iter()
        .filter(|i| i.spec.service == service)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_servers_lose_an_etcd_member_and_the_leading_server_and_lose_nothing() {
    let mut etcd = EtcdCluster::start(3);
    let url = etcd_url(&etcd);
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let registry = tempfile::tempdir().unwrap();
    let mut servers: Vec<Option<Up>> = vec![Some(server(&url, dirs[0].path(), registry.path()))];
    let token = std::fs::read_to_string(dirs[0].path().join("admin.token"))
        .unwrap()
        .trim()
        .to_owned();
    for d in &dirs[1..] {
        std::fs::copy(
            dirs[0].path().join("admin.token"),
            d.path().join("admin.token"),
        )
        .unwrap();
        servers.push(Some(server(&url, d.path(), registry.path())));
    }
    // A session per server (one shared session would make the load wait, request after
    // request, for a server whose watch cache is behind while its etcd member is replaced).
    let clients: Vec<Client> = servers
        .iter()
        .map(|s| Client::new(&s.as_ref().unwrap().url, Some(token.clone())).unwrap())
        .collect();
    let urls: Vec<String> = servers
        .iter()
        .map(|s| s.as_ref().unwrap().url.clone())
        .collect();
    let c0 = &clients[0];
    let stop = Arc::new(AtomicBool::new(false));
    // The simulated node, its lease renewed through whichever server answers.
    let lease = tenant_and_node(&clients, stop.clone()).await;
    c0.create(Some("acme"), &service("before", 2))
        .await
        .unwrap();
    placed(c0, "before", 2).await;
    one_registry_behind_three_servers(&urls, &token).await;

    // Writes through all three servers, the whole time.
    let acked = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let load = write_load(&clients, stop.clone(), acked.clone());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let dead_member = etcd.wait_leader(Duration::from_secs(10));
    etcd.kill(dead_member);
    tokio::time::sleep(Duration::from_secs(3)).await;

    // The server leading the controllers goes, by its own PID.
    let store = hive_store::EtcdStore::connect(etcd.store_options())
        .await
        .unwrap();
    let leading = server_of(&stable_leader(&store).await, &urls);
    let survivor = clients[(leading + 1) % 3].clone();
    // A watcher of the services on the server about to die; when its stream ends it resumes
    // on another server from the last revision it saw.
    // What exists, and the revision it was read at, in one read.
    let page = survivor
        .list_page::<Service>(Some("acme"), Some(1000), None)
        .await
        .unwrap();
    assert!(page.continue_.is_none(), "more than a page of services");
    let from = page.revision;
    let before: std::collections::HashSet<String> =
        page.items.into_iter().map(|s| s.name).collect();
    let seen = Arc::new(std::sync::Mutex::new(Vec::<(u64, String)>::new()));
    let (opened, is_open) = tokio::sync::oneshot::channel::<()>();
    let watcher = {
        let (first, then, seen) = (clients[leading].clone(), survivor.clone(), seen.clone());
        tokio::spawn(async move {
            let mut last = from;
            let mut opened = Some(opened);
            for c in [first, then] {
                let Ok(mut stream) = c.watch::<Service>(Some("acme"), Some(last)).await else {
                    continue;
                };
                if let Some(tx) = opened.take() {
                    let _ = tx.send(());
                }
                while let Some(Ok(ev)) = stream.next().await {
                    last = last.max(ev.revision);
                    if ev.type_ == hive_api::WatchEventType::Added
                        && let Some(s) = ev.object
                    {
                        seen.lock().unwrap().push((ev.revision, s.name));
                    }
                }
            }
        })
    };
    // Killed as soon as the watch is open (leadership must not move meanwhile).
    tokio::time::timeout(Duration::from_secs(5), is_open)
        .await
        .expect("the watch opens")
        .expect("the watcher runs");
    drop(servers[leading].take());
    let killed_at = Instant::now();
    survivor
        .create(Some("acme"), &service("after", 2))
        .await
        .unwrap();
    let failover = placed(&survivor, "after", 2).await.max(killed_at.elapsed());
    eprintln!("placement by the new leader {failover:?} after the leading server was killed");
    assert!(failover < Duration::from_secs(10), "{failover:?}");
    // Load on the remaining servers for a while yet.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    lease.await.unwrap();

    // Every acknowledged write is there; the first service still has exactly its two
    // instances (no second controller ever made more).
    let acked = acked.lock().unwrap().clone();
    assert_none_lost(&survivor, &acked).await;
    assert_eq!(instances(&survivor, "before").await.len(), 2);
    assert_eq!(instances(&survivor, "after").await.len(), 2);

    // The watch across the server's death: every service created after it began exactly
    // once, in revision order (no gap, no repeat).
    let expected: std::collections::BTreeSet<String> = service_names(&survivor)
        .await
        .filter(|n| !before.contains(n))
        .collect();
    let t0 = Instant::now();
    loop {
        let names: std::collections::BTreeSet<String> = seen
            .lock()
            .unwrap()
            .iter()
            .map(|(_, n)| n.clone())
            .collect();
        if names == expected {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the watch missed {:?} and saw extra {:?}",
            expected.difference(&names).collect::<Vec<_>>(),
            names.difference(&expected).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    watcher.abort();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), expected.len(), "a service was delivered twice");
    assert!(
        seen.windows(2).all(|w| w[0].0 < w[1].0),
        "events out of order across the resume"
    );
    eprintln!(
        "one watch across the server's death: {} creations, each once, in order",
        seen.len()
    );
    eprintln!(
        "{} writes acknowledged through three servers, none lost",
        acked.len()
    );
}

/// The wall clock of the server at `url`, from the `Date` header of its answer.
fn server_date(url: &str) -> chrono::DateTime<chrono::Utc> {
    use std::io::{Read, Write};
    let addr = url.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET /healthz HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let date = response
        .lines()
        .find_map(|l| {
            l.split_once(':')
                .filter(|(k, _)| k.eq_ignore_ascii_case("date"))
        })
        .unwrap_or_else(|| panic!("no Date header from {url}: {response}"))
        .1
        .trim();
    chrono::DateTime::parse_from_rfc2822(date)
        .unwrap()
        .with_timezone(&chrono::Utc)
}

/// One heartbeat write as the test saw it: when, at which revision, by whom, which renewal.
#[derive(Clone, Debug)]
struct Beat {
    at: Instant,
    revision: u64,
    holder: String,
    renewals: u64,
}

/// Records every write of the heartbeat key from now on (resuming after a lost watch).
fn record_beats(
    store: Arc<hive_store::EtcdStore>,
    beats: Arc<std::sync::Mutex<Vec<Beat>>>,
) -> tokio::task::JoinHandle<()> {
    use hive_store::Store;
    tokio::spawn(async move {
        let mut after = store.current_revision().await.unwrap();
        loop {
            if let Ok(mut w) = store.watch(hive_server::leader::BEAT_KEY, after).await {
                while let Some(Ok(e)) = w.next().await {
                    after = e.revision();
                    let v: serde_json::Value = serde_json::from_slice(&e.kv.value).unwrap();
                    beats.lock().unwrap().push(Beat {
                        at: Instant::now(),
                        revision: e.revision(),
                        holder: v["holder"].as_str().unwrap().to_owned(),
                        renewals: v["renewals"].as_u64().unwrap(),
                    });
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

/// Clock skew between servers: server 0's clocks are the machine's, server 1's wall clock is
/// an hour ahead and both its clocks run 1.5× fast, server 2's are an hour behind and run at
/// 0.7×. The leader is killed twice, so each server leads in turn. Leadership never passes
/// back and forth, every heartbeat after a takeover is the new holder's, each new leader
/// places within the bound, no service ever has more instances than it asked for, and no
/// acknowledged write is lost. The skew is checked to be in effect: each server's `Date`
/// header, and the rate at which each renews the heartbeat (every `ttl / 4` of its own
/// monotonic clock, so 1.5× and 0.7× as often as server 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_servers_with_skewed_clocks_keep_one_leader_and_lose_nothing() {
    const SKEW: [(Option<&str>, i64, f64); 3] = [
        (None, 0, 1.0),
        (Some("+1h x1.5"), 3600, 1.5),
        (Some("-1h x0.7"), -3600, 0.7),
    ];
    let etcd = EtcdCluster::start(3);
    let url = etcd_url(&etcd);
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let registry = tempfile::tempdir().unwrap();
    let start = |i: usize| match SKEW[i].0 {
        None => server(&url, dirs[i].path(), registry.path()),
        Some(f) => skewed_server(&url, dirs[i].path(), registry.path(), f),
    };
    let mut servers: Vec<Option<Up>> = vec![Some(start(0))];
    for d in &dirs[1..] {
        std::fs::copy(
            dirs[0].path().join("admin.token"),
            d.path().join("admin.token"),
        )
        .unwrap();
    }
    servers.extend((1..3).map(|i| Some(start(i))));
    let token = common::admin_token(dirs[0].path());
    let urls: Vec<String> = servers
        .iter()
        .map(|s| s.as_ref().unwrap().url.clone())
        .collect();
    let clients: Vec<Client> = urls
        .iter()
        .map(|u| Client::new(u, Some(token.clone())).unwrap())
        .collect();

    // The skew is in effect: each server's wall clock, within what its rate adds in a minute.
    for (i, u) in urls.iter().enumerate() {
        let offset = (server_date(u) - chrono::Utc::now()).num_seconds();
        let want = SKEW[i].1;
        assert!(
            (offset - want).abs() <= 60,
            "server {i} ({:?}): its clock is {offset} s off, not {want} s: is libfaketime \
             working?",
            SKEW[i].0
        );
    }

    let store = Arc::new(
        hive_store::EtcdStore::connect(etcd.store_options())
            .await
            .unwrap(),
    );
    let beats = Arc::new(std::sync::Mutex::new(Vec::<Beat>::new()));
    let recorder = record_beats(store.clone(), beats.clone());
    let stop = Arc::new(AtomicBool::new(false));
    let lease = tenant_and_node(&clients, stop.clone()).await;
    clients[0]
        .create(Some("acme"), &service("before", 2))
        .await
        .unwrap();
    placed(&clients[0], "before", 2).await;
    // The most instances each service ever had, sampled through the servers in turn.
    let most = Arc::new(std::sync::Mutex::new(std::collections::HashMap::<
        String,
        usize,
    >::new()));
    let sampler = {
        let (clients, stop, most) = (clients.clone(), stop.clone(), most.clone());
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                if let Ok(l) = clients[i % 3].list::<Instance>(Some("acme")).await {
                    let mut counts = std::collections::HashMap::<String, usize>::new();
                    for inst in l.items {
                        *counts.entry(inst.spec.service).or_default() += 1;
                    }
                    let mut most = most.lock().unwrap();
                    for (s, n) in counts {
                        let m = most.entry(s).or_default();
                        *m = (*m).max(n);
                    }
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let acked = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let load = write_load(&clients, stop.clone(), acked.clone());
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Kill the leader twice; each time another server must place a new service.
    let mut leaders = Vec::new();
    let mut failovers = Vec::new();
    for round in 0..2 {
        let leading = server_of(&stable_leader(&store).await, &urls);
        leaders.push(leading);
        drop(servers[leading].take());
        let killed_at = Instant::now();
        let survivor = (0..3).find(|&i| servers[i].is_some()).unwrap();
        let name = format!("after-{round}");
        clients[survivor]
            .create(Some("acme"), &service(&name, 2))
            .await
            .unwrap();
        placed(&clients[survivor], &name, 2).await;
        let failover = killed_at.elapsed();
        let next = server_of(&term_holder(&store).await, &urls);
        assert_ne!(next, leading, "the killed server still holds the term");
        eprintln!(
            "server {leading} ({:?}) killed: server {next} ({:?}) leads and placed {name} \
             {failover:?} later",
            SKEW[leading].0, SKEW[next].0
        );
        assert!(failover < Duration::from_secs(10), "{failover:?}");
        failovers.push(failover);
        // Long enough for the new leader's renewal rate to show: at least five renewals of
        // its term recorded (the slow server renews every ~1.07 s).
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let renewals = {
                let b = beats.lock().unwrap();
                let holder = b.last().map(|x| x.holder.clone());
                b.iter()
                    .rev()
                    .take_while(|x| Some(&x.holder) == holder.as_ref())
                    .count()
            };
            if renewals >= 5 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the new leader renewed {renewals} times in 20 s"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let last = (0..3).find(|&i| servers[i].is_some()).unwrap();
    leaders.push(last);
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    lease.await.unwrap();
    sampler.await.unwrap();
    recorder.abort();
    let _ = recorder.await;

    // One leader at a time: the heartbeat's writers form one run per term, in the order the
    // servers led, each run starting with a takeover (renewal 0) and counting up; a deposed
    // holder never wrote again.
    let beats = beats.lock().unwrap().clone();
    let mut runs: Vec<Vec<Beat>> = Vec::new();
    for b in beats {
        match runs.last_mut() {
            Some(r) if r[0].holder == b.holder => r.push(b),
            _ => runs.push(vec![b]),
        }
    }
    let order: Vec<usize> = runs
        .iter()
        .map(|r| server_of(&r[0].holder, &urls))
        .collect();
    assert_eq!(order, leaders, "terms in the heartbeat's history");
    for (k, r) in runs.iter().enumerate() {
        assert!(
            k == 0 || r[0].renewals == 0,
            "term {k} did not begin with a takeover: {:?}",
            r[0]
        );
        assert!(
            r.windows(2)
                .all(|w| w[1].renewals == w[0].renewals + 1 && w[1].revision > w[0].revision),
            "term {k}: renewals out of order: {r:?}"
        );
    }
    // Each leader renewed every ttl / 4 of its own monotonic clock: the fake rates show.
    let mut period = [Duration::ZERO; 3];
    for r in &runs {
        let mut gaps: Vec<Duration> = r.windows(2).map(|w| w[1].at - w[0].at).collect();
        assert!(gaps.len() >= 3, "too few renewals to time: {r:?}");
        gaps.sort();
        let s = server_of(&r[0].holder, &urls);
        period[s] = gaps[gaps.len() / 2];
    }
    for k in 1..runs.len() {
        let (old, new) = (&runs[k - 1], &runs[k]);
        eprintln!(
            "takeover by server {}: {:?} after server {}'s last renewal",
            order[k],
            new[0].at - old.last().unwrap().at,
            order[k - 1]
        );
    }
    eprintln!(
        "renewal period (real time) per server: {period:?}; expected 0.75 s divided by {:?}",
        SKEW.map(|s| s.2)
    );
    for (i, p) in period.iter().enumerate() {
        let expected = Duration::from_secs_f64(0.75 / SKEW[i].2);
        let ratio = p.as_secs_f64() / expected.as_secs_f64();
        assert!(
            (0.85..1.25).contains(&ratio),
            "server {i} renewed every {p:?}, not about {expected:?}: is its monotonic clock \
             faked?"
        );
    }

    // Nothing lost; no service ever had more instances than it asked for.
    let survivor = &clients[last];
    let acked = acked.lock().unwrap().clone();
    assert_none_lost(survivor, &acked).await;
    let most = most.lock().unwrap().clone();
    for s in ["before", "after-0", "after-1"] {
        assert_eq!(instances(survivor, s).await.len(), 2, "{s}");
        assert!(most.get(s).is_some_and(|&n| n <= 2), "{s}: {most:?}");
    }
    eprintln!(
        "{} writes acknowledged through three skewed servers, none lost; failovers {failovers:?}",
        acked.len()
    );
}
