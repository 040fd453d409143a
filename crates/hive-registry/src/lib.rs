//! Hive's OCI image registry: the distribution spec v1.1 API under `/v2/`, the Docker token
//! flow, and a content-addressed blob store on the local filesystem.
//!
//! It knows repositories, blobs, manifests and tags, never instances or Hive's store: who a
//! token belongs to is asked through [`RegistryAuth`], which the server implements. Mount
//! [`router`] into the server; it answers in the spec's error format on its own.

pub mod auth;
pub mod error;
pub mod manifest;
pub mod names;
mod routes;
pub mod storage;
pub mod usage;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use auth::{Principal, RegistryAuth};
pub use error::{Code, RegistryError};
pub use routes::router;
pub use storage::{GcReport, RepoInfo};

/// How the registry runs.
#[derive(Clone, Debug)]
pub struct RegistryConfig {
    /// Where blobs, uploads and repositories live (`DATA_DIR/registry` in Hive).
    pub root: PathBuf,
    /// The `service` of the token flow.
    pub service: String,
    /// The token endpoint's absolute URL; `None`: `http://<Host header>/v2/token`.
    pub realm: Option<String>,
    /// Lifetime of a registry token.
    pub token_ttl: Duration,
    /// Upload sessions older than this are refused and purged.
    pub upload_ttl: Duration,
}

impl RegistryConfig {
    pub fn new(root: PathBuf) -> Self {
        Self {
            root,
            service: "hive-registry".into(),
            realm: None,
            token_ttl: Duration::from_secs(300),
            upload_ttl: Duration::from_secs(24 * 3600),
        }
    }
}

/// One registry: its storage, its token signer and the seam to Hive's authentication.
pub struct Registry {
    pub storage: storage::Storage,
    pub config: RegistryConfig,
    auth: Arc<dyn RegistryAuth>,
    signer: auth::Signer,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Registry {
    /// Creates nothing on disk until the first write.
    pub fn new(config: RegistryConfig, auth: Arc<dyn RegistryAuth>) -> Self {
        Self {
            storage: storage::Storage::new(config.root.clone(), config.upload_ttl),
            signer: auth::Signer::shared(&config.root),
            config,
            auth,
        }
    }
}
