//! The service controller against a real server (HTTP on loopback, embedded store): replicas
//! become instances, scaling adds and removes them, deleting a service deletes them, and
//! tenants do not touch each other.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hive_api::{ContainerSpec, Instance, Service, ServiceSpec, Tenant};
use hive_client::Client;
use hive_server::controllers::ServiceController;
use hive_server::{RateLimit, ServerConfig};
use hive_store::{RedbStore, Store};

struct Server {
    client: Client,
    _dir: tempfile::TempDir,
}

async fn start() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> =
        Arc::new(RedbStore::open(dir.path().join("state.redb"), Default::default()).unwrap());
    hive_server::bootstrap(&store, dir.path()).await.unwrap();
    let admin = std::fs::read_to_string(dir.path().join("admin.token"))
        .unwrap()
        .trim()
        .to_owned();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let config = ServerConfig {
        data_dir: dir.path().to_owned(),
        rate_limit: RateLimit {
            per_sec: 0.0,
            burst: 0.0,
        },
        ..Default::default()
    };
    tokio::spawn(hive_server::serve(
        store,
        config,
        listener,
        std::future::pending(),
    ));
    let client = Client::new(&url, Some(admin)).unwrap();
    tokio::spawn(ServiceController::new(client.clone()).run());
    Server { client, _dir: dir }
}

fn service(name: &str, replicas: u32) -> Service {
    Service {
        name: name.into(),
        spec: ServiceSpec {
            replicas,
            template: ContainerSpec {
                image: "busybox".into(),
                ..Default::default()
            },
        },
        ..Default::default()
    }
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
        c.create(
            None,
            &Tenant {
                name: t.into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
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
    c.create(
        None,
        &Tenant {
            name: "late".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    c.create(Some("late"), &service("api", 2)).await.unwrap();
    instances(c, "late", "api", 2).await;
}
