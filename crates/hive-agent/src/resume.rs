//! What the agent saves so that, restarted, it catches up from its last revision instead of
//! listing every instance: per tenant, the revision its instance cache was at and the
//! instances it needs at that revision (those bound to this node, and every instance on a
//! tenant network, whose endpoints the node programs). One file per tenant,
//! `<dir>/tenants/<tenant>.json`, written atomically (temporary file renamed over it; not
//! fsynced, see [`write_atomic`]), and `<dir>/catch-up.json`, how each tenant's cache
//! started last time.
//!
//! A file that is missing, unreadable, corrupt, of another version or of another node means
//! "list", never an error: the saved state is an optimisation, the API the truth. This
//! module owns those files and nothing else; it does not talk to the API.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use hive_api::Instance;
use hive_client::reflector::Start;
use serde::{Deserialize, Serialize};

/// The format of the saved files; another one is ignored (listed instead).
pub const VERSION: u32 = 1;

/// The report of how each tenant's cache started, in the directory (beside `tenants/`).
pub const REPORT_FILE: &str = "catch-up.json";

/// One tenant's instance cache at a revision.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Saved {
    pub version: u32,
    /// The node that saved it: another node's state is not this one's (its instances were
    /// filtered for that node).
    pub node: String,
    pub tenant: String,
    /// The store revision the instances are at.
    pub revision: u64,
    pub instances: Vec<Instance>,
}

/// How one tenant's instance cache started (`catch-up.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "start", deny_unknown_fields)]
pub enum Report {
    /// Loaded from the saved state at `from` and caught up by watching from it: `changes`
    /// events up to `to` (the server's revision then).
    Resumed {
        from: u64,
        to: u64,
        changes: u64,
        caught_up: bool,
    },
    /// Listed whole at `revision`, for `reason`.
    Listed { revision: u64, reason: String },
}

impl Report {
    pub fn of(start: &Start) -> Option<Report> {
        match start {
            Start::Pending => None,
            Start::Listed { revision, reason } => Some(Report::Listed {
                revision: *revision,
                reason: reason.clone(),
            }),
            Start::Resumed {
                from,
                to,
                changes,
                caught_up,
            } => Some(Report::Resumed {
                from: *from,
                to: *to,
                changes: *changes,
                caught_up: *caught_up,
            }),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ResumeError {
    #[error("read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parse {path}: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: version {found}, this agent reads {VERSION}")]
    Version { path: PathBuf, found: u32 },
    #[error("{path}: saved by node {found}, this is {node}")]
    OtherNode {
        path: PathBuf,
        found: String,
        node: String,
    },
    #[error("{path}: holds tenant {found}")]
    OtherTenant { path: PathBuf, found: String },
    #[error("write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The file of `tenant`'s saved state.
pub fn path(dir: &Path, tenant: &str) -> PathBuf {
    dir.join("tenants").join(format!("{tenant}.json"))
}

/// Reads one saved state and checks it belongs to `node` and `tenant`.
pub fn load(dir: &Path, tenant: &str, node: &str) -> Result<Saved, ResumeError> {
    let path = path(dir, tenant);
    let bytes = std::fs::read(&path).map_err(|source| ResumeError::Read {
        path: path.clone(),
        source,
    })?;
    // The version first, so that another format says so rather than "unknown field".
    #[derive(Deserialize)]
    struct Version {
        version: u32,
    }
    let v: Version = serde_json::from_slice(&bytes).map_err(|source| ResumeError::Parse {
        path: path.clone(),
        source,
    })?;
    if v.version != VERSION {
        return Err(ResumeError::Version {
            path,
            found: v.version,
        });
    }
    let saved: Saved = serde_json::from_slice(&bytes).map_err(|source| ResumeError::Parse {
        path: path.clone(),
        source,
    })?;
    if saved.node != node {
        return Err(ResumeError::OtherNode {
            path,
            found: saved.node,
            node: node.to_owned(),
        });
    }
    if saved.tenant != tenant {
        return Err(ResumeError::OtherTenant {
            path,
            found: saved.tenant,
        });
    }
    Ok(saved)
}

/// Every tenant's saved state in `dir` that `node` can resume from. What cannot be used is
/// logged and skipped (that tenant is listed); a missing directory is no saved state.
pub fn load_all(dir: &Path, node: &str) -> HashMap<String, Saved> {
    let mut out = HashMap::new();
    let Ok(entries) = std::fs::read_dir(dir.join("tenants")) else {
        return out;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(tenant) = name.strip_suffix(".json") else {
            continue;
        };
        match load(dir, tenant, node) {
            Ok(s) => {
                out.insert(tenant.to_owned(), s);
            }
            Err(e) => tracing::warn!(%tenant, error = %e, "saved instance state unusable: listing"),
        }
    }
    out
}

/// Writes `bytes` to `path` atomically: a temporary file beside it, renamed over it, so a
/// reader (a restarted agent) finds the old file or the new one, never a mix.
///
/// Not fsynced: the saved state has to outlive the agent's process (which it does once the
/// rename is done: the page cache is the kernel's), not the machine. After a power loss no
/// container runs any more, and whatever the file then holds is safe to start from: an
/// older revision is caught up from (or listed, once compacted away), a torn or empty file
/// is listed. An fsync of the file and of its directory cost every start that changed the
/// instances bound here two disk flushes (~8 ms here) before the container could start,
/// since the save comes before the pass acts.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ResumeError> {
    let err = |source| ResumeError::Write {
        path: path.to_owned(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(err)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::File::create(&tmp).map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(err)
}

/// Saves one tenant's state.
pub fn save(dir: &Path, saved: &Saved) -> Result<(), ResumeError> {
    let path = path(dir, &saved.tenant);
    let bytes = serde_json::to_vec(saved).map_err(|e| ResumeError::Write {
        path: path.clone(),
        source: e.into(),
    })?;
    write_atomic(&path, &bytes)
}

/// Forgets `tenant`'s saved state (the tenant is gone, or its state could not be saved and
/// must not be resumed from).
pub fn remove(dir: &Path, tenant: &str) {
    let path = path(dir, tenant);
    if let Err(e) = std::fs::remove_file(&path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), error = %e, "remove saved instance state");
    }
}

/// Writes `catch-up.json`.
pub fn write_report(dir: &Path, report: &BTreeMap<String, Report>) -> Result<(), ResumeError> {
    let path = dir.join(REPORT_FILE);
    let bytes = serde_json::to_vec_pretty(report).map_err(|e| ResumeError::Write {
        path: path.clone(),
        source: e.into(),
    })?;
    write_atomic(&path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn saved(tenant: &str, node: &str) -> Saved {
        let mut i = Instance {
            name: "web-1".into(),
            tenant: tenant.into(),
            uid: "u1".into(),
            revision: 7,
            ..Default::default()
        };
        i.spec.node = Some(node.into());
        Saved {
            version: VERSION,
            node: node.into(),
            tenant: tenant.into(),
            revision: 9,
            instances: vec![i],
        }
    }

    #[test]
    fn a_saved_state_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let s = saved("red", "n1");
        save(dir.path(), &s).unwrap();
        assert_eq!(load(dir.path(), "red", "n1").unwrap(), s);
        // No temporary file is left beside it.
        let files: Vec<String> = std::fs::read_dir(dir.path().join("tenants"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(files, ["red.json"]);
        let all = load_all(dir.path(), "n1");
        assert_eq!(all.len(), 1);
        assert_eq!(all["red"], s);
    }

    #[test]
    fn missing_corrupt_or_foreign_files_mean_list_never_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        // No directory at all.
        assert!(load_all(&dir.path().join("absent"), "n1").is_empty());
        assert!(matches!(
            load(dir.path(), "red", "n1"),
            Err(ResumeError::Read { .. })
        ));
        let good = saved("green", "n1");
        save(dir.path(), &good).unwrap();
        let bytes = serde_json::to_vec(&good).unwrap();
        // Cut short (a crash mid-write without the rename would leave this in a temp file;
        // here it is the file itself), garbage, empty.
        std::fs::write(path(dir.path(), "red"), &bytes[..bytes.len() / 2]).unwrap();
        assert!(matches!(
            load(dir.path(), "red", "n1"),
            Err(ResumeError::Parse { .. })
        ));
        std::fs::write(path(dir.path(), "blue"), b"\x00\xffnot json").unwrap();
        std::fs::write(path(dir.path(), "pink"), b"").unwrap();
        // Another version, with fields this one does not know.
        std::fs::write(
            path(dir.path(), "grey"),
            br#"{"version": 2, "cursor": {"rev": 1}}"#,
        )
        .unwrap();
        assert!(matches!(
            load(dir.path(), "grey", "n1"),
            Err(ResumeError::Version { found: 2, .. })
        ));
        // Another node's, and a file that holds another tenant.
        save(dir.path(), &saved("teal", "n2")).unwrap();
        assert!(matches!(
            load(dir.path(), "teal", "n1"),
            Err(ResumeError::OtherNode { .. })
        ));
        std::fs::write(
            path(dir.path(), "cyan"),
            serde_json::to_vec(&saved("navy", "n1")).unwrap(),
        )
        .unwrap();
        assert!(matches!(
            load(dir.path(), "cyan", "n1"),
            Err(ResumeError::OtherTenant { .. })
        ));
        // A leftover temporary file and the report are not tenants.
        std::fs::write(dir.path().join("tenants/olive.json.tmp"), b"{").unwrap();
        write_report(dir.path(), &BTreeMap::new()).unwrap();
        let all = load_all(dir.path(), "n1");
        assert_eq!(all.keys().collect::<Vec<_>>(), ["green"]);
    }

    #[test]
    fn a_save_replaces_the_previous_one_and_remove_forgets_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = saved("red", "n1");
        save(dir.path(), &s).unwrap();
        s.revision = 12;
        s.instances.clear();
        save(dir.path(), &s).unwrap();
        assert_eq!(load(dir.path(), "red", "n1").unwrap().revision, 12);
        remove(dir.path(), "red");
        remove(dir.path(), "red");
        assert!(load_all(dir.path(), "n1").is_empty());
    }

    #[test]
    fn the_report_says_how_each_tenant_started() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = BTreeMap::new();
        r.insert(
            "red".to_owned(),
            Report::of(&Start::Resumed {
                from: 5,
                to: 9,
                changes: 3,
                caught_up: true,
            })
            .unwrap(),
        );
        r.insert(
            "blue".to_owned(),
            Report::of(&Start::Listed {
                revision: 9,
                reason: "no saved state".into(),
            })
            .unwrap(),
        );
        write_report(dir.path(), &r).unwrap();
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join(REPORT_FILE)).unwrap()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "red": {"start": "resumed", "from": 5, "to": 9, "changes": 3, "caught_up": true},
                "blue": {"start": "listed", "revision": 9, "reason": "no saved state"},
            })
        );
        assert_eq!(Report::of(&Start::Pending), None);
    }
}
