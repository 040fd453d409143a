//! `hive down`: removes what a node made, found from its agent's data dir once the agent is
//! gone — its containers and their supervisors, their root filesystems and every other mount
//! under the data dir, their cgroups in every hierarchy, and the node's network state (the
//! links, namespace files and nftables tables of its prefix, in the network namespace this
//! runs in: the node's).
//!
//! It refuses to run while an agent holds the data dir ([`DirLock`]) and holds the lock
//! itself meanwhile, so no agent starts under it. Nothing outside what the data dir names is
//! touched: cgroups only at the paths of its containers (parents only once empty), network
//! state only of its prefix, and not even that, unless forced, when processes are still in
//! namespaces of the prefix once the node's containers are gone (another node using the
//! prefix in this network namespace).
//! What stays: images and the server's data (the saved watch state goes with its tmpfs); an
//! agent started on the data dir again lists and starts whatever is still placed on the node.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hive_net::{NodeNet, NodeNetConfig, Owned};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::datadir::{CONTAINERS_DIR, DataDirError, DirLock, LOGS_DIR, NetRecord, NodeRecord};
use crate::image::{ImageStore, StoreConfig};
use crate::runtime::alive;
use crate::runtime::shim::{self, Started};
use crate::runtime::{
    OciRuntime, RuntimeKind, cgroups, is_supervisor_of, runtime_of_container, supervisor_of,
};

/// How long a process killed here may take to be gone (and its cgroup with it).
const GONE_WITHIN: Duration = Duration::from_secs(5);

/// What to assume where the data dir has no [`NodeRecord`] (an agent from before records).
#[derive(Clone, Debug, Default)]
pub struct DownOptions {
    /// The OCI runtime of its containers (default runc).
    pub runtime: Option<String>,
    /// The prefix of its network state; without one (and no record) the network is left.
    pub net_prefix: Option<String>,
    /// Its underlay device (bandwidth classes are removed from it; default lo).
    pub underlay_dev: Option<String>,
    /// Remove the prefix's network state even while processes are in its namespaces once the
    /// node's containers are gone (another node with the same prefix in this namespace would
    /// lose its network).
    pub force: bool,
}

/// What a teardown did.
#[derive(Debug, Default)]
pub struct DownReport {
    /// What was removed, one line each.
    pub removed: Vec<String>,
    /// Every failure; the rest was done all the same.
    pub errors: Vec<DownError>,
}

#[derive(Debug, thiserror::Error)]
pub enum DownError {
    #[error(
        "{dir}: not an agent data dir (none of containers/, runtime/, images/, node.json in it)"
    )]
    NotANode { dir: PathBuf },
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    #[error("container {id}: {message}")]
    Container { id: String, message: String },
    #[error("the node's runtime: {0}")]
    Runtime(String),
    #[error("open the image store: {0}")]
    Images(crate::image::ImageError),
    #[error("the teardown task failed: {0}")]
    Task(String),
    #[error("unmount {path}: {source}")]
    Unmount {
        path: PathBuf,
        source: nix::errno::Errno,
    },
    #[error("remove cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("network prefix {prefix}: {source}")]
    Net {
        prefix: String,
        source: hive_net::NetError,
    },
    #[error(
        "network prefix {prefix}: processes of no container of this node are in its \
         namespaces ({files}): another node uses the prefix in this network namespace, so none \
         of its network state was removed (force it to remove it all the same)"
    )]
    ForeignNetwork { prefix: String, files: String },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The agent data dir of `dir`: `dir/agent` for a `hive up` data dir, else `dir` itself.
pub fn agent_dir(dir: &Path) -> Result<PathBuf, DownError> {
    let is_agent = |d: &Path| {
        [
            CONTAINERS_DIR,
            crate::datadir::RUNTIME_DIR,
            "images",
            crate::datadir::RECORD_FILE,
        ]
        .iter()
        .any(|m| d.join(m).exists())
    };
    let up = dir.join("agent");
    if is_agent(&up) {
        Ok(up)
    } else if is_agent(dir) {
        Ok(dir.to_owned())
    } else {
        Err(DownError::NotANode {
            dir: dir.to_owned(),
        })
    }
}

/// Removes everything the node of agent data dir `dir` made (see the module's doc).
pub async fn down(dir: &Path, opts: &DownOptions) -> Result<DownReport, DownError> {
    let dir = std::fs::canonicalize(dir).map_err(|source| DownError::Io {
        op: "open",
        path: dir.to_owned(),
        source,
    })?;
    let _lock = DirLock::acquire(&dir)?;
    let record = NodeRecord::read(&dir)?;
    let mut report = DownReport::default();
    let runtime = runtime_of(&dir, record.as_ref(), opts)?;
    let d = dir.clone();
    let blocking = tokio::task::spawn_blocking(move || {
        let mut report = DownReport::default();
        remove_containers(&runtime, &d, &mut report);
        remove_mounts(&d, &mut report);
        report
    })
    .await
    .map_err(|e| DownError::Task(e.to_string()))?;
    report.removed.extend(blocking.removed);
    report.errors.extend(blocking.errors);
    let net = record.as_ref().and_then(|r| r.net.clone()).or_else(|| {
        opts.net_prefix.clone().map(|prefix| NetRecord {
            prefix,
            underlay_dev: opts.underlay_dev.clone().unwrap_or_else(|| "lo".into()),
            netns_dir: "/run/netns".into(),
        })
    });
    if let Some(net) = net {
        remove_network(&net, opts.force, &mut report).await;
    }
    Ok(report)
}

fn runtime_of(
    dir: &Path,
    record: Option<&NodeRecord>,
    opts: &DownOptions,
) -> Result<OciRuntime, DownError> {
    let (kind, binary) = match record {
        Some(r) => (r.runtime.clone(), r.runtime_binary.clone()),
        None => {
            let kind = opts.runtime.clone().unwrap_or_else(|| "runc".into());
            (kind.clone(), PathBuf::from(kind))
        }
    };
    let kind: RuntimeKind = kind.parse().map_err(DownError::Runtime)?;
    Ok(OciRuntime::new(
        kind,
        binary,
        dir.join(crate::datadir::RUNTIME_DIR),
    ))
}

/// Container ids with a directory under `dir/sub`.
fn ids_in(dir: &Path, sub: &str) -> BTreeSet<String> {
    std::fs::read_dir(dir.join(sub))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect()
}

fn wait_gone(pids: &[i32], within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while pids.iter().any(|p| alive(*p)) {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// The cgroup path in container `dir`'s bundle.
fn cgroup_of(dir: &Path) -> Option<PathBuf> {
    let raw = std::fs::read(dir.join("bundle/config.json")).ok()?;
    let spec: oci_spec::runtime::Spec = serde_json::from_slice(&raw).ok()?;
    spec.linux().as_ref()?.cgroups_path().clone()
}

fn remove_containers(rt: &OciRuntime, dir: &Path, report: &mut DownReport) {
    let containers = dir.join(CONTAINERS_DIR);
    let mut ids = ids_in(dir, CONTAINERS_DIR);
    ids.extend(ids_in(dir, crate::datadir::RUNTIME_DIR));
    ids.extend(ids_in(dir, LOGS_DIR));
    for id in ids {
        let cdir = containers.join(&id);
        // Each with the runtime that made it (the node's may have changed since).
        let rt = runtime_of_container(&cdir, &id, rt);
        if let Err(message) = remove_container(&rt, &cdir, &id, report) {
            report.errors.push(DownError::Container { id, message });
            continue;
        }
        // Its logs once nothing of it runs.
        let logs = dir.join(LOGS_DIR).join(&id);
        match std::fs::remove_dir_all(&logs) {
            Ok(()) => report.removed.push(format!("removed the logs of {id}")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => report.errors.push(DownError::Container {
                id,
                message: format!("remove {}: {e}", logs.display()),
            }),
        }
    }
}

/// Stops container `id` (everything in it, and its supervisor), removes it from the runtime,
/// its cgroups and its directory `cdir`.
fn remove_container(
    rt: &OciRuntime,
    cdir: &Path,
    id: &str,
    report: &mut DownReport,
) -> Result<(), String> {
    let cgroup = cgroup_of(cdir);
    let started: Option<Started> = shim::read_json(cdir, shim::STARTED);
    // A start in flight (its supervisor has the configuration, no start record yet): the
    // supervisor and the runtime it runs go first, or they would finish the start after
    // everything below, and leave a running container of a node that is gone.
    if started.is_none()
        && let Some(pid) = supervisor_of(id)
    {
        // Its process group: the supervisor leads its own (its session's), the runtime is in it.
        let group = nix::unistd::getpgid(Some(Pid::from_raw(pid))).ok() == Some(Pid::from_raw(pid));
        let _ = match group {
            true => kill(Pid::from_raw(-pid), Signal::SIGKILL),
            false => kill(Pid::from_raw(pid), Signal::SIGKILL),
        };
        if !wait_gone(&[pid], GONE_WITHIN) {
            return Err(format!("supervisor {pid} of a start in flight did not die"));
        }
        report.removed.push(format!(
            "stopped supervisor {pid} of container {id}, a start in flight"
        ));
    }
    let was_running = started
        .as_ref()
        .is_some_and(|s| alive(s.pid) || alive(s.shim_pid));
    // Counted before the runtime removes them, to say what went.
    let hierarchies = cgroup.as_deref().map_or(0, |cg| cgroups::dirs(cg).len());
    // The runtime kills every process of the container and removes its cgroups and state.
    let deleted = match rt.root.join(id).exists() {
        true => rt.delete(id, true).map_err(|e| e.to_string()),
        false => Ok(()),
    };
    // Whatever still runs in its cgroup (the runtime never finished creating it, or failed).
    if let Some(cg) = &cgroup {
        let pids = cgroups::procs(cg);
        for pid in &pids {
            let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
        }
        if !wait_gone(&pids, GONE_WITHIN) {
            return Err(format!(
                "processes {pids:?} of cgroup {} did not die",
                cg.display()
            ));
        }
    }
    // The supervisor records the exit and ends; one that does not is killed.
    if let Some(s) = &started
        && is_supervisor_of(s.shim_pid, id)
        && !wait_gone(&[s.shim_pid], GONE_WITHIN)
    {
        let _ = kill(Pid::from_raw(s.shim_pid), Signal::SIGKILL);
        if !wait_gone(&[s.shim_pid], GONE_WITHIN) {
            return Err(format!("supervisor {} did not die", s.shim_pid));
        }
    }
    if let Some(s) = started.as_ref().filter(|_| was_running) {
        report.removed.push(format!(
            "stopped container {id} (pid {}, supervisor {})",
            s.pid, s.shim_pid
        ));
    }
    if let Some(cg) = &cgroup {
        let (_, failed) = cgroups::remove(cg, GONE_WITHIN);
        let gone = hierarchies.saturating_sub(failed.len());
        if gone > 0 {
            report.removed.push(format!(
                "removed cgroup {} ({gone} hierarchies)",
                cg.display()
            ));
        }
        for (path, source) in failed {
            report.errors.push(DownError::Cgroup { path, source });
        }
    }
    // State the runtime could not delete (it never finished writing it): nothing of the
    // container runs any more, so it is only files.
    let state = rt.root.join(id);
    if state.exists() {
        std::fs::remove_dir_all(&state).map_err(|e| {
            let why = deleted.as_ref().err().cloned().unwrap_or_default();
            format!("remove {}: {e} ({why})", state.display())
        })?;
    }
    match std::fs::remove_dir_all(cdir) {
        Ok(()) => report.removed.push(format!("removed container {id}")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("remove {}: {e}", cdir.display())),
    }
    Ok(())
}

/// Root filesystems (through the image store), then any other mount under the data dir.
fn remove_mounts(dir: &Path, report: &mut DownReport) {
    let images = dir.join("images");
    if images.join("instances").is_dir() {
        match ImageStore::open(StoreConfig::new(&images)) {
            Ok(store) => {
                for id in store.instance_ids() {
                    let errors = store.release_rootfs(&id);
                    if errors.is_empty() {
                        report
                            .removed
                            .push(format!("removed root filesystem of {id}"));
                    }
                    report
                        .errors
                        .extend(errors.into_iter().map(|e| DownError::Container {
                            id: id.clone(),
                            message: e.to_string(),
                        }));
                }
            }
            Err(e) => report.errors.push(DownError::Images(e)),
        }
    }
    let mut under: Vec<PathBuf> = cgroups::mounts()
        .into_iter()
        .map(|(point, _)| point)
        .filter(|p| p.starts_with(dir) && p != dir)
        .collect();
    // Deepest first: a mount inside another goes before it.
    under.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    under.dedup();
    for path in under {
        match nix::mount::umount2(&path, nix::mount::MntFlags::MNT_DETACH) {
            Ok(()) => report.removed.push(format!("unmounted {}", path.display())),
            Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => {}
            Err(source) => report.errors.push(DownError::Unmount { path, source }),
        }
    }
}

/// The inode of the network namespace a namespace file holds.
fn netns_inode(file: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(file).ok().map(|m| m.ino())
}

/// The network namespaces some process is in (their inodes).
fn occupied_netns() -> BTreeSet<u64> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| std::fs::read_link(e.path().join("ns/net")).ok())
        .filter_map(|link| {
            let s = link.to_string_lossy().into_owned();
            s.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect()
}

/// The prefix's links, namespace files and tables in this network namespace.
async fn remove_network(net: &NetRecord, force: bool, report: &mut DownReport) {
    let prefix = net.prefix.clone();
    let err = |source| DownError::Net {
        prefix: prefix.clone(),
        source,
    };
    let mut cfg = NodeNetConfig::new(Ipv4Addr::LOCALHOST, net.underlay_dev.clone());
    cfg.prefix = net.prefix.clone();
    cfg.netns_dir = net.netns_dir.clone();
    let node = match NodeNet::open_existing(cfg).await {
        Ok(n) => n,
        Err(e) => return report.errors.push(err(e)),
    };
    let before = match node.owned().await {
        Ok(o) => o,
        Err(e) => return report.errors.push(err(e)),
    };
    if before.is_empty() {
        return;
    }
    // This node's containers are gone by now: a process still in one of the prefix's
    // namespaces is another node's (the same prefix in this network namespace).
    let occupied = occupied_netns();
    let foreign: Vec<&String> = before
        .netns
        .iter()
        .filter(|f| netns_inode(&net.netns_dir.join(f)).is_some_and(|ino| occupied.contains(&ino)))
        .collect();
    if !foreign.is_empty() && !force {
        let files = foreign
            .iter()
            .map(|f| net.netns_dir.join(f).display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        return report
            .errors
            .push(DownError::ForeignNetwork { prefix, files });
    }
    if let Err(e) = node.teardown_all().await {
        report.errors.push(err(e));
    }
    let after = node.owned().await.unwrap_or_else(|e| {
        report.errors.push(err(e));
        before.clone()
    });
    let Owned {
        links,
        netns,
        tables,
    } = before;
    for l in links.iter().filter(|l| !after.links.contains(l)) {
        report.removed.push(format!("removed link {l}"));
    }
    for f in netns.iter().filter(|f| !after.netns.contains(f)) {
        report.removed.push(format!(
            "removed network namespace {}",
            net.netns_dir.join(f).display()
        ));
    }
    for t in tables.iter().filter(|t| !after.tables.contains(t)) {
        report.removed.push(format!("removed nftables table {t}"));
    }
}
