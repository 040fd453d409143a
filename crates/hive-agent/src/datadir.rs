//! What an agent's data dir says about the node beyond its containers: who holds it (a lock
//! the running agent keeps) and how the node was set up (the runtime, the network prefix),
//! so that `hive down` can find and remove what the node made after the agent is gone.
//!
//! Owns `agent.lock` and `node.json` in the data dir, and the tmpfs mounts on its `runtime/`,
//! `containers/` and `watch/` (see [`mount_state_dirs`]); touches nothing else.

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

/// The OCI runtime's state directory (its `--root`) in the data dir.
pub const RUNTIME_DIR: &str = "runtime";
/// The containers' own state in the data dir: one directory each (bundle, the runtime it was
/// made with, what its supervisor recorded, its `resolv.conf`).
pub const CONTAINERS_DIR: &str = "containers";
/// The containers' logs in the data dir (one directory each): on the data dir's file system,
/// since they may be large.
pub const LOGS_DIR: &str = "logs";
/// The agent's saved watch state in the data dir (`resume`): what a restarted agent catches
/// up from.
pub const WATCH_DIR: &str = "watch";

/// The state directories that go on a tmpfs, and the most each holds: crun keeps a few KiB
/// per container, a container's own state (its spec is most of it) ~10 KiB, the watch state
/// a copy of the instances the node needs (~2 KiB each).
const STATE_TMPFS: [(&str, &str); 3] = [
    (RUNTIME_DIR, "64m"),
    (CONTAINERS_DIR, "256m"),
    (WATCH_DIR, "256m"),
];

/// What [`mount_state_dirs`] found or did for one directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateMount {
    /// A tmpfs was mounted on it.
    Mounted,
    /// It was a mount point already (the tmpfs an earlier run of the agent mounted).
    Kept,
    /// It holds the state of containers an agent made before it was mounted: left on the
    /// data dir's file system, which those containers' state stays on.
    OnDisk,
}

/// Puts the containers' state, the OCI runtime's and the saved watch state (`containers/`,
/// `runtime/` and `watch/` in agent data dir `dir`) on tmpfs mounts, as runtimes and
/// containerd keep theirs under `/run` on ordinary hosts: it is small, needs to outlive the
/// agent but not the machine (a reboot ends the containers; the agent then clears the root
/// filesystems and logs left without one, and lists instead of catching up), and a start
/// writes ~15 files there. On a file system with slow inode allocation (these hosts' root,
/// ext4 without a journal, checks every recently freed inode), that is milliseconds of every
/// start, and what the data dir's file system has to write back makes every fsync of the
/// store slower. The mounts outlive the agent (its next run keeps them); `hive down` removes them
/// with the data dir's other mounts. Returns what it did for each directory.
pub fn mount_state_dirs(dir: &Path) -> Result<Vec<(&'static str, StateMount)>, DataDirError> {
    let mut out = Vec::new();
    for (name, size) in STATE_TMPFS {
        out.push((name, mount_state(&dir.join(name), size)?));
    }
    Ok(out)
}

fn mount_state(path: &Path, size: &str) -> Result<StateMount, DataDirError> {
    std::fs::create_dir_all(path).map_err(io("create", path))?;
    let path = std::fs::canonicalize(path).map_err(io("open", path))?;
    if crate::runtime::cgroups::mounts()
        .iter()
        .any(|(point, _)| *point == path)
    {
        return Ok(StateMount::Kept);
    }
    let mut entries = std::fs::read_dir(&path).map_err(io("read", &path))?;
    if entries.next().is_some() {
        return Ok(StateMount::OnDisk);
    }
    nix::mount::mount(
        Some("hive-state"),
        &path,
        Some("tmpfs"),
        nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
        Some(format!("mode=0700,size={size}").as_str()),
    )
    .map_err(|e| io("mount a tmpfs on", &path)(e.into()))?;
    Ok(StateMount::Mounted)
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

    /// Unmounts the tmpfs at `path` when dropped, so a failing test leaves no mount.
    struct Unmount(PathBuf);

    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }

    fn tmpfs_at(path: &Path) -> bool {
        crate::runtime::cgroups::mounts()
            .iter()
            .any(|(point, fstype)| point == path && fstype == "tmpfs")
    }

    #[test]
    fn the_state_dirs_go_on_a_tmpfs_once_and_an_earlier_agents_stay_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        let paths = [
            root.join(RUNTIME_DIR),
            root.join(CONTAINERS_DIR),
            root.join(WATCH_DIR),
        ];
        let states = mount_state_dirs(dir.path()).unwrap();
        let _unmount = paths.clone().map(Unmount);
        assert_eq!(
            states,
            [
                (RUNTIME_DIR, StateMount::Mounted),
                (CONTAINERS_DIR, StateMount::Mounted),
                (WATCH_DIR, StateMount::Mounted)
            ]
        );
        for path in &paths {
            assert!(tmpfs_at(path), "no tmpfs at {}", path.display());
            let mode = std::fs::metadata(path).unwrap().permissions();
            assert_eq!(
                std::os::unix::fs::PermissionsExt::mode(&mode) & 0o7777,
                0o700
            );
            // A second run keeps the mount (and what is on it) rather than stacking another.
            std::fs::write(path.join("kept"), b"x").unwrap();
        }
        let again = mount_state_dirs(dir.path()).unwrap();
        assert!(
            again.iter().all(|(_, s)| *s == StateMount::Kept),
            "{again:?}"
        );
        for path in &paths {
            assert!(path.join("kept").exists());
            let stacked = crate::runtime::cgroups::mounts()
                .iter()
                .filter(|(point, _)| point == path)
                .count();
            assert_eq!(stacked, 1);
        }

        // A data dir whose containers' state is on disk already keeps it there; an empty
        // runtime dir beside it still gets its tmpfs.
        let old = tempfile::tempdir().unwrap();
        let old_root = std::fs::canonicalize(old.path()).unwrap();
        let old_state = old_root.join(CONTAINERS_DIR).join("c1");
        std::fs::create_dir_all(&old_state).unwrap();
        let states = mount_state_dirs(old.path()).unwrap();
        let _unmount_old = [RUNTIME_DIR, WATCH_DIR].map(|d| Unmount(old_root.join(d)));
        assert_eq!(
            states,
            [
                (RUNTIME_DIR, StateMount::Mounted),
                (CONTAINERS_DIR, StateMount::OnDisk),
                (WATCH_DIR, StateMount::Mounted)
            ]
        );
        assert!(old_state.exists());
        assert!(!tmpfs_at(&old_root.join(CONTAINERS_DIR)));
    }
}
