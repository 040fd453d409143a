//! The paths a runtime mounts over in every container (`/proc`, `/dev`, `/sys`,
//! `/etc/resolv.conf`), made in a root filesystem when it is composed, as Docker's init layer
//! holds them, rather than by the runtime while the container starts: each one the runtime
//! makes is a new file in the instance's upper layer, on the data dir's file system, inside
//! the start.

use std::fs::{self, DirBuilder, File};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

/// A path (absolute, in the container) that a runtime mounts over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountPoint {
    pub path: PathBuf,
    /// A file (a bind-mounted file's target), else a directory.
    pub file: bool,
}

/// Makes each missing mount point under `rootfs` (missing parents as directories, mode
/// 0755; a file empty, mode 0644). A path that exists, or that goes through anything but a
/// directory (a symlink above all: it could lead out of `rootfs`), is left as it is, for
/// the runtime to handle as it would have. Nothing else is written.
pub fn make(rootfs: &Path, points: &[MountPoint]) -> io::Result<()> {
    for p in points {
        make_one(rootfs, p)?;
    }
    Ok(())
}

fn make_one(rootfs: &Path, p: &MountPoint) -> io::Result<()> {
    let names: Vec<_> = p
        .path
        .components()
        .filter(|c| !matches!(c, Component::RootDir))
        .collect();
    let mut at = rootfs.to_owned();
    for (i, c) in names.iter().enumerate() {
        let Component::Normal(name) = c else {
            return Ok(());
        };
        at.push(name);
        let last = i + 1 == names.len();
        match fs::symlink_metadata(&at) {
            Ok(m) if !last && m.is_dir() => {}
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if last && p.file {
                    File::options()
                        .write(true)
                        .create_new(true)
                        .mode(0o644)
                        .open(&at)?;
                } else {
                    DirBuilder::new().mode(0o755).create(&at)?;
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(path: &str, file: bool) -> MountPoint {
        MountPoint {
            path: path.into(),
            file,
        }
    }

    #[test]
    fn missing_points_are_made_and_nothing_goes_through_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("rootfs");
        let outside = dir.path().join("outside");
        fs::create_dir_all(root.join("sys")).unwrap();
        fs::create_dir_all(&outside).unwrap();
        fs::write(root.join("sys/keep"), b"x").unwrap();
        // A symlink planted where a parent would be, and one as the point itself.
        std::os::unix::fs::symlink(&outside, root.join("etc")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("dev")).unwrap();
        let points = [
            point("/proc", false),
            point("/sys", false),
            point("/dev", false),
            point("/etc/resolv.conf", true),
            point("/run/a/b", false),
            point("/x/../y", false),
        ];
        make(&root, &points).unwrap();
        assert!(root.join("proc").is_dir());
        assert!(
            root.join("sys/keep").exists(),
            "an existing dir is left as it is"
        );
        assert!(root.join("run/a/b").is_dir());
        assert!(!root.join("y").exists() && root.join("x").is_dir());
        assert_eq!(
            fs::read_dir(&outside).unwrap().count(),
            0,
            "wrote through a symlink"
        );
        assert!(fs::symlink_metadata(root.join("dev")).unwrap().is_symlink());
        // Again on the same tree: nothing to do, no error.
        make(&root, &points).unwrap();

        let other = dir.path().join("other");
        fs::create_dir_all(other.join("etc")).unwrap();
        make(&other, &points).unwrap();
        let conf = fs::symlink_metadata(other.join("etc/resolv.conf")).unwrap();
        assert!(conf.is_file() && conf.len() == 0);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(conf.permissions().mode() & 0o777, 0o644);
        assert!(other.join("dev").is_dir());
    }
}
