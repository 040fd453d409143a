//! The state every handler shares.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hive_registry::{Registry, RegistryConfig};
use hive_store::{EtcdStoreOptions, Store, WatchCache, WatchCacheOptions};

use crate::ratelimit::{RateLimit, RateLimiter};

/// How a server runs. Defaults suit `hive up` on one machine.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Where the embedded store (when it is the store), the admin token and the registry's
    /// blobs live.
    pub data_dir: PathBuf,
    /// Where the registry's blobs and repositories live (`None`: `DATA_DIR/registry`).
    /// Servers on one etcd share one directory: the registry orders what must be ordered
    /// between them with file locks.
    pub registry_dir: Option<PathBuf>,
    /// Where the state lives.
    pub store: StoreBackend,
    /// Largest request body accepted.
    pub body_limit_bytes: usize,
    pub rate_limit: RateLimit,
    /// How often an idle watch stream gets a `BOOKMARK` line.
    pub bookmark_interval: Duration,
    /// Revisions of history kept for watches to resume from.
    pub keep_revisions: u64,
    /// Events older than this are deleted.
    pub event_retention: Duration,
    /// How often compaction and event clean-up run.
    pub housekeeping_interval: Duration,
    /// How often the registry's garbage is collected (first one interval after start).
    pub registry_gc_interval: Duration,
    /// Reads and watches are served from a watch cache with these options (`None`: straight
    /// from the store).
    pub watch_cache: Option<WatchCacheOptions>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("/var/lib/hive"),
            registry_dir: None,
            store: StoreBackend::Embedded,
            body_limit_bytes: 1 << 20,
            rate_limit: RateLimit::default(),
            bookmark_interval: Duration::from_secs(10),
            keep_revisions: 100_000,
            event_retention: Duration::from_secs(3600),
            housekeeping_interval: Duration::from_secs(30),
            registry_gc_interval: Duration::from_secs(3600),
            watch_cache: Some(WatchCacheOptions::default()),
        }
    }
}

/// The store a server opens at launch.
#[derive(Clone, Debug, Default)]
pub enum StoreBackend {
    /// redb in `DATA_DIR/state.redb`: one server on one machine (the default).
    #[default]
    Embedded,
    /// An etcd cluster, shared by every server given the same endpoints.
    Etcd(EtcdStoreOptions),
}

/// What every handler shares: one pointer, so that the clones axum makes for each request
/// and layer cost one reference count, not one per field.
#[derive(Clone, Debug)]
pub struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

pub struct Shared {
    /// What handlers read and write: the watch cache when there is one, else the store.
    pub store: Arc<dyn Store>,
    /// The watch cache in front of the store, if the server runs one.
    pub cache: Option<Arc<WatchCache>>,
    pub limiter: Arc<RateLimiter>,
    pub config: Arc<ServerConfig>,
    /// The image registry served under `/v2/`, its data under `DATA_DIR/registry`.
    pub registry: Arc<Registry>,
    /// The key that signs node proxy tokens (loaded from the store on first use).
    pub proxy_signer: Arc<tokio::sync::OnceCell<hive_api::ProxySigner>>,
    /// The HTTP client requests to agents go through.
    pub proxy_http: Arc<tokio::sync::OnceCell<reqwest::Client>>,
    /// Which instance addresses this server believes held (the store decides).
    pub ipam: Arc<crate::networks::Ipam>,
    /// Tokens already resolved, checked against the store on every use.
    pub principals: crate::auth::PrincipalCache,
    /// Objects' API JSON, kept per revision for reads that find them unchanged.
    pub rendered: crate::rendered::Rendered,
    /// Tenants decoded per revision (every tenant-scoped request reads its tenant).
    pub tenants: crate::rendered::Decoded<hive_api::Tenant>,
    /// Becomes true when the server shuts down: long-lived streams end so that graceful
    /// shutdown does not wait for watchers forever.
    closing: tokio::sync::watch::Receiver<bool>,
    closer: Arc<tokio::sync::watch::Sender<bool>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl AppState {
    pub fn new(store: Arc<dyn Store>, config: ServerConfig) -> Self {
        Self::build(store, None, config)
    }

    /// A server reading through `cache` (writes go through it to its store).
    pub fn cached(cache: Arc<WatchCache>, config: ServerConfig) -> Self {
        Self::build(cache.clone(), Some(cache), config)
    }

    fn build(store: Arc<dyn Store>, cache: Option<Arc<WatchCache>>, config: ServerConfig) -> Self {
        let (closer, closing) = tokio::sync::watch::channel(false);
        let principals = crate::auth::PrincipalCache::default();
        let registry = Registry::new(
            RegistryConfig::new(
                config
                    .registry_dir
                    .clone()
                    .unwrap_or_else(|| config.data_dir.join("registry")),
            ),
            Arc::new(crate::auth::RegistryTokens {
                store: store.clone(),
                principals: principals.clone(),
            }),
        );
        Self(Arc::new(Shared {
            cache,
            registry: Arc::new(registry),
            proxy_signer: Arc::default(),
            proxy_http: Arc::default(),
            ipam: Arc::new(crate::networks::Ipam::new(matches!(
                config.store,
                StoreBackend::Etcd(_)
            ))),
            store,
            limiter: Arc::new(RateLimiter::new(config.rate_limit)),
            config: Arc::new(config),
            principals,
            rendered: Default::default(),
            tenants: Default::default(),
            closing,
            closer: Arc::new(closer),
        }))
    }

    /// Ends every watch stream (called when the server begins to shut down).
    pub fn close(&self) {
        let _ = self.closer.send(true);
    }

    /// Resolves once [`AppState::close`] was called.
    pub async fn closed(&self) {
        let mut rx = self.closing.clone();
        let _ = rx.wait_for(|closing| *closing).await;
    }
}
