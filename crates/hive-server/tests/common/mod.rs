//! What the tests that drive a real server over HTTP share: the server (embedded store in a
//! temporary directory, no rate limit), a service and a tenant.

use hive_api::{ContainerSpec, Service, ServiceSpec, Tenant};
use hive_client::Client;
use hive_server::{RateLimit, ServerConfig};

/// A running server and an admin client of it; the directory goes with it.
pub struct Server {
    pub client: Client,
    pub _dir: tempfile::TempDir,
}

/// A server on 127.0.0.1 with its embedded store in a new temporary directory.
pub async fn launch() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let config = ServerConfig {
        data_dir: dir.path().to_owned(),
        rate_limit: RateLimit {
            per_sec: 0.0,
            burst: 0.0,
        },
        ..Default::default()
    };
    let server = hive_server::launch(
        config,
        "127.0.0.1:0".parse().unwrap(),
        std::future::pending(),
    )
    .await
    .unwrap();
    let client = Client::new(&server.url, Some(server.admin_token)).unwrap();
    Server { client, _dir: dir }
}

/// A service of `replicas` busybox instances.
pub fn service(name: &str, replicas: u32) -> Service {
    Service {
        name: name.into(),
        spec: ServiceSpec {
            replicas,
            template: ContainerSpec {
                image: "busybox".into(),
                ..Default::default()
            },
            ..Default::default()
        },
        ..Default::default()
    }
}

pub async fn add_tenant(c: &Client, name: &str) {
    c.create(
        None,
        &Tenant {
            name: name.into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
}
