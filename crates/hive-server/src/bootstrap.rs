//! First start of a fresh data dir: create the platform admin and write its token to
//! `admin.token` (mode 0600). Later starts find the marker in the store and do nothing.
//!
//! The token file is written (to a temporary name, fsynced) before the store transaction and
//! renamed after it, so a crash at any point leaves either no admin, or an admin whose token
//! is on disk (a leftover temporary file is promoted on the next start).

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use hive_api::Role;
use hive_store::{ConflictKind, Op, Store, StoreError};

use crate::auth;
use crate::keys;

pub const ADMIN_TOKEN_FILE: &str = "admin.token";

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

/// What bootstrap found or did.
#[derive(Debug, PartialEq, Eq)]
pub enum Bootstrap {
    /// The platform admin was created; its token is in the file.
    Created { token_file: PathBuf },
    /// The data dir was bootstrapped before.
    Existing,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BootstrapError + '_ {
    move |source| BootstrapError::Io {
        path: path.to_owned(),
        source,
    }
}

pub async fn bootstrap(
    store: &Arc<dyn Store>,
    data_dir: &Path,
) -> Result<Bootstrap, BootstrapError> {
    let file = data_dir.join(ADMIN_TOKEN_FILE);
    let tmp = data_dir.join(format!("{ADMIN_TOKEN_FILE}.tmp"));
    if store.get(keys::BOOTSTRAP).await?.kv.is_some() {
        if !file.exists() && tmp.exists() {
            fs::rename(&tmp, &file).map_err(io(&file))?;
        }
        crate::networks::ensure_default_networks(store.as_ref()).await?;
        return Ok(Bootstrap::Existing);
    }
    let (secret, record) = auth::issue("admin", None, Role::PlatformAdmin, None);
    write_secret(&tmp, &secret)?;
    let value = Bytes::from(serde_json::to_vec(&record).unwrap_or_default());
    let ops = vec![
        Op::Create {
            key: keys::BOOTSTRAP.to_owned(),
            value: Bytes::from_static(b"{}"),
        },
        Op::Create {
            key: keys::auth(&record.hash),
            value: value.clone(),
        },
        Op::Create {
            key: keys::token_index(None, &record.info.id),
            value,
        },
    ];
    match store.txn(ops).await {
        Ok(_) => {
            fs::rename(&tmp, &file).map_err(io(&file))?;
            if let Ok(dir) = fs::File::open(data_dir) {
                let _ = dir.sync_all();
            }
            Ok(Bootstrap::Created { token_file: file })
        }
        Err(StoreError::Conflict {
            kind: ConflictKind::Exists { .. },
            ..
        }) => {
            // Another server bootstrapped the same store first.
            let _ = fs::remove_file(&tmp);
            Ok(Bootstrap::Existing)
        }
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(e.into())
        }
    }
}

fn write_secret(path: &Path, secret: &str) -> Result<(), BootstrapError> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    writeln!(f, "{secret}").map_err(io(path))?;
    f.sync_all().map_err(io(path))
}
