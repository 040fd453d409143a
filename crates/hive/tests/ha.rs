//! Three `hive server` processes on a 3-member etcd (the real binaries, on loopback), one
//! simulated node (an API object whose lease the test renews): writes go through all three
//! servers while the etcd leader is killed and then the server leading the controllers;
//! every acknowledged write is there afterwards, no service has more instances than it
//! asked for (never two controllers at once), and the scheduler of the new leader places.

#[path = "../../hive-store/tests/support/mod.rs"]
mod support;

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{HIVE, Up, start_until};
use hive_api::{
    ContainerSpec, Instance, Node, NodeCapacity, NodeStatus, Service, ServiceSpec, Tenant,
};
use hive_client::Client;
use support::EtcdCluster;

fn server(etcd_url: &str, data: &Path) -> Up {
    let mut cmd = Command::new(HIVE);
    cmd.args(["server", "--store", etcd_url, "--listen", "127.0.0.1:0"])
        .args(["--rate-limit", "0", "--node-grace-secs", "8", "--data-dir"])
        .arg(data);
    start_until(cmd, "hive server: API at ")
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
    let url = format!(
        "etcd://{}",
        etcd.endpoints()
            .iter()
            .map(|e| e.trim_start_matches("http://").to_owned())
            .collect::<Vec<_>>()
            .join(",")
    );
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut servers: Vec<Option<Up>> = vec![Some(server(&url, dirs[0].path()))];
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
        servers.push(Some(server(&url, d.path())));
    }
    let clients: Vec<Client> = servers
        .iter()
        .map(|s| Client::new(&s.as_ref().unwrap().url, Some(token.clone())).unwrap())
        .collect();
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
    // The simulated node, its lease renewed through whichever server answers.
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
    let stop = Arc::new(AtomicBool::new(false));
    let lease = {
        let (clients, stop) = (clients.clone(), stop.clone());
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
    };
    c0.create(Some("acme"), &service("before", 2))
        .await
        .unwrap();
    let placed = |c: Client, svc: &'static str, n: usize| async move {
        let t0 = Instant::now();
        loop {
            let is = instances(&c, svc).await;
            if is.len() == n && is.iter().all(|i| i.spec.node.as_deref() == Some("sim")) {
                return t0.elapsed();
            }
            assert!(t0.elapsed() < Duration::from_secs(30), "{svc}: {is:#?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    placed(c0.clone(), "before", 2).await;

    // Writes through all three servers, the whole time.
    let acked = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let load = {
        let (clients, stop, acked) = (clients.clone(), stop.clone(), acked.clone());
        tokio::spawn(async move {
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let name = format!("w-{i}");
                if clients[i % 3]
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
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let dead_member = etcd.wait_leader(Duration::from_secs(10));
    etcd.kill(dead_member);
    tokio::time::sleep(Duration::from_secs(3)).await;

    // The server leading the controllers goes, by its own PID.
    let store = hive_store::EtcdStore::connect(etcd.store_options())
        .await
        .unwrap();
    let term = hive_store::Store::get(&store, hive_server::leader::LEADER_KEY)
        .await
        .unwrap()
        .kv
        .expect("a leader");
    let holder: serde_json::Value = serde_json::from_slice(&term.value).unwrap();
    let holder = holder["holder"].as_str().unwrap().to_owned();
    let leading = servers
        .iter()
        .position(|s| holder.starts_with(&s.as_ref().unwrap().url))
        .expect("the leader is one of the three");
    drop(servers[leading].take());
    let killed_at = Instant::now();
    let survivor = clients[(leading + 1) % 3].clone();
    survivor
        .create(Some("acme"), &service("after", 2))
        .await
        .unwrap();
    let failover = placed(survivor.clone(), "after", 2)
        .await
        .max(killed_at.elapsed());
    eprintln!("placement by the new leader {failover:?} after the leading server was killed");
    assert!(failover < Duration::from_secs(10), "{failover:?}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    lease.await.unwrap();

    // Every acknowledged write is there; the first service still has exactly its two
    // instances (no second controller ever made more).
    let names: std::collections::HashSet<String> = survivor
        .list::<Service>(Some("acme"))
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|s| s.name)
        .collect();
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > 50, "only {} writes acknowledged", acked.len());
    let missing: Vec<&String> = acked.iter().filter(|n| !names.contains(*n)).collect();
    assert!(missing.is_empty(), "acknowledged but missing: {missing:?}");
    assert_eq!(instances(&survivor, "before").await.len(), 2);
    assert_eq!(instances(&survivor, "after").await.len(), 2);
    eprintln!(
        "{} writes acknowledged through three servers, none lost",
        acked.len()
    );
}
