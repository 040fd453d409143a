//! The CLI config: server URL, token and default tenant, in a 0600 JSON file.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: String,
    pub token: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

/// `explicit`, else `$XDG_CONFIG_HOME/hive/config.json`, else `~/.config/hive/config.json`.
pub fn path(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_owned());
    }
    let base = match std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        Some(x) => PathBuf::from(x),
        None => PathBuf::from(
            std::env::var_os("HOME")
                .context("neither XDG_CONFIG_HOME nor HOME is set: pass --config")?,
        )
        .join(".config"),
    };
    Ok(base.join("hive").join("config.json"))
}

/// The config at `path`, or None if there is none.
pub fn load(path: &Path) -> Result<Option<Config>> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .with_context(|| format!("read config {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("read config {}", path.display())),
    }
}

/// Writes the config atomically with mode 0600 (it holds a secret).
pub fn save(path: &Path, cfg: &Config) -> Result<()> {
    let dir = path
        .parent()
        .context("config path has no parent directory")?;
    fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let tmp = path.with_extension("json.tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("write {}", tmp.display()))?;
    // An existing file keeps its mode through O_CREAT: force 0600.
    f.set_permissions(fs::Permissions::from_mode(0o600))?;
    f.write_all(&serde_json::to_vec_pretty(cfg)?)?;
    f.sync_all()?;
    fs::rename(&tmp, path).with_context(|| format!("write {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_is_private_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/config.json");
        assert!(load(&p).unwrap().is_none());
        let cfg = Config {
            server: "http://127.0.0.1:7080".into(),
            token: "hive_x".into(),
            tenant: Some("acme".into()),
        };
        save(&p, &cfg).unwrap();
        let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let back = load(&p).unwrap().unwrap();
        assert_eq!(back.token, "hive_x");
        assert_eq!(back.tenant.as_deref(), Some("acme"));
    }
}
