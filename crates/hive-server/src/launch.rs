//! Starting a server on the embedded store: the one path `hive up`, `hive server`, the
//! benchmarks and the tests share.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use hive_store::{RedbStore, Store, StoreError};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::bootstrap::{ADMIN_TOKEN_FILE, Bootstrap, BootstrapError, bootstrap};
use crate::state::ServerConfig;

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

/// Creates the data dir if needed, opens the embedded store in it, bootstraps the platform
/// admin on first start, binds `listen` and serves until `shutdown` resolves.
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
    let db = dir.join(STORE_FILE);
    let store: Arc<dyn Store> =
        Arc::new(RedbStore::open(&db, Default::default()).map_err(|source| {
            LaunchError::Store {
                path: db.clone(),
                source,
            }
        })?);
    let bootstrapped = matches!(bootstrap(&store, &dir).await?, Bootstrap::Created { .. });
    let token_path = dir.join(ADMIN_TOKEN_FILE);
    let admin_token = std::fs::read_to_string(&token_path)
        .map_err(|source| LaunchError::Io {
            op: "read",
            path: token_path.clone(),
            source,
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
    let task = tokio::spawn(crate::serve(store.clone(), config, listener, shutdown));
    Ok(Launched {
        url: format!("http://{addr}"),
        admin_token,
        bootstrapped,
        store,
        task,
    })
}
