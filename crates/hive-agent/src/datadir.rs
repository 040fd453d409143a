//! What an agent's data dir says about the node beyond its containers: who holds it (a lock
//! the running agent keeps) and how the node was set up (the runtime, the network prefix),
//! so that `hive down` can find and remove what the node made after the agent is gone.
//!
//! Owns `agent.lock` and `node.json` in the data dir; touches nothing else.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The lock file: held (`flock`, exclusive) by the agent for as long as it runs; it holds the
/// agent's pid for the message of whoever finds it taken.
pub const LOCK_FILE: &str = "agent.lock";
/// The node's setup, written at every start of its agent.
pub const RECORD_FILE: &str = "node.json";

#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error("agent data dir {dir} is in use by process {pid} (a running hive up or hive agent)")]
    Locked { dir: PathBuf, pid: String },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a node record: {source}")]
    BadRecord {
        path: PathBuf,
        source: serde_json::Error,
    },
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> DataDirError {
    let path = path.to_owned();
    move |source| DataDirError::Io { op, path, source }
}

/// The data dir's lock, held until dropped (or the process ends: the kernel lets go of it
/// with the last descriptor, which no child inherits, being close-on-exec).
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

impl DirLock {
    /// Takes the lock of agent data dir `dir` (made if missing), or says who holds it.
    pub fn acquire(dir: &Path) -> Result<DirLock, DataDirError> {
        std::fs::create_dir_all(dir).map_err(io("create", dir))?;
        let path = dir.join(LOCK_FILE);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io("open", &path))?;
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                let pid = match pid.trim() {
                    "" => "unknown".to_owned(),
                    p => p.to_owned(),
                };
                return Err(DataDirError::Locked {
                    dir: dir.to_owned(),
                    pid,
                });
            }
            Err(e) => return Err(io("lock", &path)(e.into())),
        }
        file.set_len(0).map_err(io("write", &path))?;
        file.rewind().map_err(io("write", &path))?;
        writeln!(file, "{}", std::process::id()).map_err(io("write", &path))?;
        Ok(DirLock { _file: file })
    }
}

/// How a node was set up: what `hive down` needs to remove what it made.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeRecord {
    /// The node's name (its saved watch state is filtered for it).
    pub node: String,
    /// The OCI runtime (`runc`, `crun`) and its binary: its containers are its to delete.
    pub runtime: String,
    pub runtime_binary: PathBuf,
    /// The node's tenant networks, when it has them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<NetRecord>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetRecord {
    /// Prefix of its links, namespace files and nftables tables.
    pub prefix: String,
    pub underlay_dev: String,
    pub netns_dir: PathBuf,
}

impl NodeRecord {
    /// Writes the record into agent data dir `dir` (atomically: a temporary file renamed).
    pub fn write(&self, dir: &Path) -> Result<(), DataDirError> {
        let path = dir.join(RECORD_FILE);
        let tmp = dir.join(format!("{RECORD_FILE}.tmp"));
        let json = serde_json::to_vec_pretty(self).map_err(|source| DataDirError::BadRecord {
            path: path.clone(),
            source,
        })?;
        std::fs::write(&tmp, json).map_err(io("write", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(io("rename", &tmp))
    }

    /// The record of agent data dir `dir`; None when it has none (an agent from before
    /// records were written, or no agent ever ran there).
    pub fn read(dir: &Path) -> Result<Option<NodeRecord>, DataDirError> {
        let path = dir.join(RECORD_FILE);
        match std::fs::read(&path) {
            Ok(raw) => serde_json::from_slice(&raw)
                .map(Some)
                .map_err(|source| DataDirError::BadRecord { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io("read", &path)(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_lock_names_its_holder_and_is_free_once_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let held = DirLock::acquire(dir.path()).unwrap();
        // flock locks belong to the open file: a second open in this process conflicts too.
        let err = DirLock::acquire(dir.path()).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(&dir.path().display().to_string())
                && msg.contains(&format!("process {}", std::process::id())),
            "{msg}"
        );
        drop(held);
        let again = DirLock::acquire(dir.path());
        assert!(again.is_ok(), "{again:?}");
    }

    #[test]
    fn records_read_back_and_bad_ones_are_named() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(NodeRecord::read(dir.path()).unwrap(), None);
        let rec = NodeRecord {
            node: "n1".into(),
            runtime: "runc".into(),
            runtime_binary: "runc".into(),
            net: Some(NetRecord {
                prefix: "t1".into(),
                underlay_dev: "lo".into(),
                netns_dir: "/run/netns".into(),
            }),
        };
        rec.write(dir.path()).unwrap();
        assert_eq!(NodeRecord::read(dir.path()).unwrap(), Some(rec));
        std::fs::write(dir.path().join(RECORD_FILE), b"{\"runtime\": 3}").unwrap();
        let err = NodeRecord::read(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains(RECORD_FILE) && err.contains("not a node record"),
            "{err}"
        );
    }
}
