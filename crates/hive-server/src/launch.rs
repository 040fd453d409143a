//! Starting a server on its store (embedded redb by default, or etcd): the one path
//! `hive up`, `hive server`, the benchmarks and the tests share.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hive_store::{
    CopyReport, EtcdStore, EtcdStoreOptions, EtcdTls, RedbStore, Store, StoreError, WatchCache,
    copy_all,
};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::bootstrap::{ADMIN_TOKEN_FILE, Bootstrap, BootstrapError, bootstrap};
use crate::state::{ServerConfig, StoreBackend};

/// The store's file inside the data dir.
pub const STORE_FILE: &str = "state.redb";

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("open the store {path} (is another hive using this data dir?): {source}")]
    Store { path: PathBuf, source: StoreError },
    #[error("connect to etcd {endpoints}: {source}")]
    Etcd {
        endpoints: String,
        source: StoreError,
    },
    #[error("store {url}: {source}")]
    StoreUrl { url: String, source: StoreError },
    #[error("load the watch cache from the store: {0}")]
    WatchCache(StoreError),
    #[error("migrate {path}: {source}")]
    Migrate { path: PathBuf, source: StoreError },
    #[error(
        "{path} is missing: the store was bootstrapped by another server; copy the platform \
         admin token from that server's data dir"
    )]
    MissingAdminToken { path: PathBuf },
    #[error(transparent)]
    Bootstrap(#[from] BootstrapError),
}

/// A running server.
pub struct Launched {
    /// `http://ADDR`, with the port actually bound.
    pub url: String,
    pub admin_token: String,
    /// The platform admin was created by this start.
    pub bootstrapped: bool,
    /// The store itself (not the server's watch cache in front of it).
    pub store: Arc<dyn Store>,
    /// Ends when the server stopped (after `shutdown` resolved).
    pub task: JoinHandle<std::io::Result<()>>,
}

impl std::fmt::Debug for Launched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Launched")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

/// The store named by `hive server --store`: `embedded`, or `etcd://HOST:PORT[,HOST:PORT…]`
/// (`etcds://` for TLS) with the PEM files of `--etcd-ca`, `--etcd-cert` and `--etcd-key`.
/// A CA alone turns on TLS for `etcd://` too.
pub fn store_backend(
    url: &str,
    ca: Option<&Path>,
    identity: Option<(&Path, &Path)>,
) -> Result<StoreBackend, LaunchError> {
    if url == "embedded" {
        if ca.is_some() || identity.is_some() {
            return Err(LaunchError::StoreUrl {
                url: url.to_owned(),
                source: StoreError::Invalid("etcd TLS files given for the embedded store".into()),
            });
        }
        return Ok(StoreBackend::Embedded);
    }
    let mut options = EtcdStoreOptions::from_url(url).map_err(|source| LaunchError::StoreUrl {
        url: url.to_owned(),
        source,
    })?;
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| LaunchError::Io {
            op: "read",
            path: path.to_owned(),
            source,
        })
    };
    if ca.is_some() || identity.is_some() || options.tls.is_some() {
        let tls = EtcdTls {
            ca_pem: ca.map(read).transpose()?,
            identity: match identity {
                Some((cert, key)) => Some((read(cert)?, read(key)?)),
                None => None,
            },
        };
        for endpoint in &mut options.endpoints {
            if let Some(rest) = endpoint.strip_prefix("http://") {
                *endpoint = format!("https://{rest}");
            }
        }
        options.tls = Some(tls);
    }
    Ok(StoreBackend::Etcd(options))
}

/// Opens the configured store: the embedded one in the data dir, or a connection to etcd
/// (which waits, with backoff, for a healthy member).
async fn open_store(config: &ServerConfig) -> Result<Arc<dyn Store>, LaunchError> {
    match &config.store {
        StoreBackend::Embedded => {
            let db = config.data_dir.join(STORE_FILE);
            let store = RedbStore::open(&db, Default::default())
                .map_err(|source| LaunchError::Store { path: db, source })?;
            Ok(Arc::new(store))
        }
        StoreBackend::Etcd(options) => {
            let store = EtcdStore::connect(options.clone())
                .await
                .map_err(|source| LaunchError::Etcd {
                    endpoints: options.endpoints.join(","),
                    source,
                })?;
            Ok(Arc::new(store))
        }
    }
}

/// `hive store migrate`: copies every key of the embedded store in `data_dir` into `to`,
/// which must be empty. The server using `data_dir` must be stopped (its store is locked
/// while it runs). Values are kept byte for byte; revisions renumber, so watchers relist.
pub async fn migrate_store(data_dir: &Path, to: &StoreBackend) -> Result<CopyReport, LaunchError> {
    let db = data_dir.join(STORE_FILE);
    if matches!(to, StoreBackend::Embedded) {
        return Err(LaunchError::Migrate {
            path: db,
            source: StoreError::Invalid(
                "the destination must be etcd (etcd://… or etcds://…)".into(),
            ),
        });
    }
    if !db.is_file() {
        return Err(LaunchError::Io {
            op: "open",
            path: db,
            source: std::io::ErrorKind::NotFound.into(),
        });
    }
    let from = RedbStore::open(&db, Default::default()).map_err(|source| LaunchError::Store {
        path: db.clone(),
        source,
    })?;
    let config = ServerConfig {
        data_dir: data_dir.to_owned(),
        store: to.clone(),
        ..Default::default()
    };
    let to = open_store(&config).await?;
    copy_all(&from, &*to)
        .await
        .map_err(|source| LaunchError::Migrate { path: db, source })
}

/// Creates the data dir if needed, opens the store, bootstraps the platform admin on first
/// start, binds `listen` and serves until `shutdown` resolves.
pub async fn launch(
    config: ServerConfig,
    listen: SocketAddr,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Launched, LaunchError> {
    let dir = config.data_dir.clone();
    std::fs::create_dir_all(&dir).map_err(|source| LaunchError::Io {
        op: "create data dir",
        path: dir.clone(),
        source,
    })?;
    let store = open_store(&config).await?;
    let bootstrapped = matches!(bootstrap(&store, &dir).await?, Bootstrap::Created { .. });
    let token_path = dir.join(ADMIN_TOKEN_FILE);
    let admin_token = std::fs::read_to_string(&token_path)
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => LaunchError::MissingAdminToken {
                path: token_path.clone(),
            },
            _ => LaunchError::Io {
                op: "read",
                path: token_path.clone(),
                source,
            },
        })?
        .trim()
        .to_owned();
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| LaunchError::Io {
            op: "listen on",
            path: listen.to_string().into(),
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| LaunchError::Io {
        op: "listen on",
        path: listen.to_string().into(),
        source,
    })?;
    let state = match config.watch_cache.clone() {
        Some(options) => {
            let cache = WatchCache::start(store.clone(), options)
                .await
                .map_err(LaunchError::WatchCache)?;
            crate::AppState::cached(Arc::new(cache), config)
        }
        None => crate::AppState::new(store.clone(), config),
    };
    let task = tokio::spawn(crate::serve(state, listener, shutdown));
    Ok(Launched {
        url: format!("http://{addr}"),
        admin_token,
        bootstrapped,
        store,
        task,
    })
}
