//! Hive's API server: authentication, tenant isolation, the resources under `/api/v1`,
//! watches, the OpenAPI document, and the upkeep of the state store.
//!
//! It never touches the host's kernel: it reads and writes the [`hive_store::Store`] and
//! serves HTTP. Controllers, the scheduler and agents are its clients.

pub mod auth;
pub mod bootstrap;
pub mod controllers;
pub mod error;
pub mod housekeeping;
pub mod images;
pub mod keys;
pub mod launch;
pub mod leader;
pub mod middleware;
pub mod networks;
pub mod nodeproxy;
mod openapi;
pub mod ratelimit;
pub mod rendered;
pub mod resources;
pub mod router;
pub mod secgroups;
pub mod services;
pub mod state;
pub mod tenancy;
pub mod tenants;
pub mod tokens;
pub mod vips;

use std::future::Future;

use tokio::net::TcpListener;

pub use bootstrap::{ADMIN_TOKEN_FILE, Bootstrap, BootstrapError, bootstrap};
pub use launch::{LaunchError, Launched, launch, migrate_store, store_backend};
pub use ratelimit::RateLimit;
pub use router::{openapi, router};
pub use state::{AppState, ServerConfig, StoreBackend};

/// Serves the API on `listener` until `shutdown` resolves, with housekeeping running beside.
pub async fn serve(
    state: AppState,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let upkeep = tokio::spawn(housekeeping::run(state.clone()));
    let collector = tokio::spawn(images::run_gc(state.clone()));
    let app = router(state.clone());
    // Watches and logs stream small writes: without TCP_NODELAY a write that follows one
    // not yet acknowledged waits for the client's delayed ACK (40 ms here), on every event.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            state.close();
        })
        .await;
    upkeep.abort();
    collector.abort();
    result
}
