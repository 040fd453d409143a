//! A container's cgroup directories in every hierarchy the host mounts (each cgroup v1
//! controller's, and the cgroup2 mount: `/sys/fs/cgroup/unified` on the hybrid hosts, or
//! `/sys/fs/cgroup` itself on a cgroup2-only one), found from the mount table rather than
//! assumed. For removing what a runtime left; the runtime makes and deletes them otherwise.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Mount points and filesystem types of this process's mount namespace.
pub(crate) fn mounts() -> Vec<(PathBuf, String)> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    table
        .lines()
        .filter_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let point = before.split(' ').nth(4)?;
            let fstype = after.split(' ').next()?;
            Some((PathBuf::from(unescape(point)), fstype.to_owned()))
        })
        .collect()
}

/// Mount points escape space, tab, newline and backslash as octal (`\040`).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The root of every cgroup hierarchy mounted here, each once.
pub(crate) fn roots() -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = mounts()
        .into_iter()
        .filter(|(_, fstype)| fstype == "cgroup" || fstype == "cgroup2")
        .map(|(point, _)| point)
        .collect();
    roots.sort();
    roots.dedup();
    roots
}

/// `cgroups_path` (`/hive/<tenant>/<instance>`) under every hierarchy where it exists.
pub(crate) fn dirs(cgroups_path: &Path) -> Vec<PathBuf> {
    let rel = cgroups_path.strip_prefix("/").unwrap_or(cgroups_path);
    if rel.as_os_str().is_empty() {
        return Vec::new();
    }
    roots()
        .into_iter()
        .map(|r| r.join(rel))
        .filter(|d| d.is_dir())
        .collect()
}

/// The processes in the cgroup `cgroups_path` in any hierarchy.
pub(crate) fn procs(cgroups_path: &Path) -> Vec<i32> {
    let mut pids: Vec<i32> = dirs(cgroups_path)
        .iter()
        .flat_map(|d| {
            std::fs::read_to_string(d.join("cgroup.procs"))
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// Removes the cgroup `cgroups_path` in every hierarchy (a process that was just killed may
/// keep it busy for a moment: retried for up to `patience`), then its parents that are left
/// empty. Returns the directories removed and those that would not go.
pub(crate) fn remove(
    cgroups_path: &Path,
    patience: Duration,
) -> (Vec<PathBuf>, Vec<(PathBuf, std::io::Error)>) {
    let (mut removed, mut failed) = (Vec::new(), Vec::new());
    let deadline = Instant::now() + patience;
    for dir in dirs(cgroups_path) {
        loop {
            match std::fs::remove_dir(&dir) {
                Ok(()) => {
                    removed.push(dir);
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e)
                    if Instant::now() < deadline && e.raw_os_error() == Some(nix::libc::EBUSY) =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    failed.push((dir, e));
                    break;
                }
            }
        }
    }
    prune_parents(cgroups_path);
    (removed, failed)
}

/// Removes the parents of `cgroups_path` (`/hive/<tenant>`, `/hive`) that are empty, in every
/// hierarchy. `rmdir` refuses a cgroup with children or tasks, so one in use stays.
pub(crate) fn prune_parents(cgroups_path: &Path) {
    let rel = cgroups_path.strip_prefix("/").unwrap_or(cgroups_path);
    for root in roots() {
        let mut p = rel.parent();
        while let Some(dir) = p.filter(|d| !d.as_os_str().is_empty()) {
            if std::fs::remove_dir(root.join(dir)).is_err() {
                break;
            }
            p = dir.parent();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_are_unescaped() {
        assert_eq!(unescape(r"/a\040b"), "/a b");
        assert_eq!(unescape(r"/x\134y"), r"/x\y");
        assert_eq!(unescape(r"/plain\04"), r"/plain\04");
    }

    #[test]
    fn this_host_has_cgroup_hierarchies() {
        let roots = roots();
        assert!(
            roots.iter().any(|r| r.starts_with("/sys/fs/cgroup")),
            "no cgroup mount under /sys/fs/cgroup: {roots:?}"
        );
    }
}
