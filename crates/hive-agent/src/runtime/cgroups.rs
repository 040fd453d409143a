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
        .filter_map(mountinfo_line)
        .map(|(point, fstype, _)| (point, fstype.to_owned()))
        .collect()
}

/// One line of `/proc/self/mountinfo`: mount point, filesystem type, superblock options.
fn mountinfo_line(line: &str) -> Option<(PathBuf, &str, &str)> {
    let (before, after) = line.split_once(" - ")?;
    let point = before.split(' ').nth(4)?;
    let mut fields = after.split(' ');
    let fstype = fields.next()?;
    let options = fields.nth(1).unwrap_or_default();
    Some((PathBuf::from(unescape(point)), fstype, options))
}

/// Turns on `favordynmods` on the host's cgroup2 superblock (keeping its other options)
/// unless it is on already; Ok(true) if this changed it, Ok(false) if there was nothing to
/// do (on already, or no cgroup2 mount: cgroup v1 cannot change it on a mounted hierarchy).
///
/// Every runtime moves each new container's process into its cgroups; the first such move
/// takes the kernel's global cgroup threadgroup lock for writing, which waits out an RCU
/// grace period: 12-13 ms of every `crun run` here (one write to `cgroup.procs`, seen with
/// strace), which dominated container start. With `favordynmods` the lock is kept in the
/// mode that needs no grace period (forks and exits pay a shared atomic instead of a
/// per-CPU counter). The lock is one for all hierarchies, so the cgroup2 mount of a hybrid
/// host speeds up the cgroup v1 moves too. It lasts until the host reboots.
pub fn favor_dynamic_modifications() -> std::io::Result<bool> {
    let table = std::fs::read_to_string("/proc/self/mountinfo")?;
    let Some((point, _, options)) = table
        .lines()
        .filter_map(mountinfo_line)
        .find(|(_, fstype, _)| *fstype == "cgroup2")
    else {
        return Ok(false);
    };
    let Some(keep) = options_with_favordynmods(options) else {
        return Ok(false);
    };
    // A reconfiguration replaces the superblock's options: the ones it has go again.
    let fs = rustix::mount::fspick(
        rustix::fs::CWD,
        &point,
        rustix::mount::FsPickFlags::FSPICK_CLOEXEC,
    )?;
    for option in keep {
        match option.split_once('=') {
            Some((key, value)) => rustix::mount::fsconfig_set_string(&fs, key, value)?,
            None => rustix::mount::fsconfig_set_flag(&fs, option)?,
        }
    }
    rustix::mount::fsconfig_reconfigure(&fs)?;
    Ok(true)
}

/// The cgroup2 superblock options to set for `favordynmods` on top of `options` (without
/// `rw`/`ro`, which are not cgroup2's own); None if it is among them already.
fn options_with_favordynmods(options: &str) -> Option<Vec<&str>> {
    let mut keep: Vec<&str> = options
        .split(',')
        .filter(|o| !o.is_empty() && *o != "rw" && *o != "ro")
        .collect();
    if keep.contains(&"favordynmods") {
        return None;
    }
    keep.push("favordynmods");
    Some(keep)
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
    fn mountinfo_lines_give_point_type_and_superblock_options() {
        let line = "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 \
                    rw,nsdelegate,memory_recursiveprot";
        let (point, fstype, options) = mountinfo_line(line).unwrap();
        assert_eq!(point, Path::new("/sys/fs/cgroup/unified"));
        assert_eq!(fstype, "cgroup2");
        assert_eq!(options, "rw,nsdelegate,memory_recursiveprot");
        assert!(mountinfo_line("garbage").is_none());
    }

    #[test]
    fn favordynmods_is_added_to_the_options_the_superblock_keeps() {
        assert_eq!(
            options_with_favordynmods("rw,nsdelegate,memory_recursiveprot"),
            Some(vec!["nsdelegate", "memory_recursiveprot", "favordynmods"])
        );
        assert_eq!(options_with_favordynmods("rw"), Some(vec!["favordynmods"]));
        assert_eq!(options_with_favordynmods("rw,favordynmods"), None);
    }

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
