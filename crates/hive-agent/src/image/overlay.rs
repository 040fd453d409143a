//! overlayfs mounts of instance root filesystems, and their removal.
//!
//! Mounts with the new mount API (`fsopen`/`fsconfig`/`fsmount`/`move_mount`), adding each
//! lower layer with `lowerdir+` (Linux 6.8+) so the number of layers is not limited by the
//! one-page option string of mount(2); on kernels without it, falls back to mount(2) with a
//! `lowerdir=a:b:c` string, which fails clearly when it would not fit. No `unsafe`: rustix
//! wraps the syscalls.
//!
//! Knows nothing about images or the store layout: it is given directories.

use std::path::{Path, PathBuf};

use rustix::io::Errno;
use rustix::mount::{
    FsMountFlags, FsOpenFlags, MountAttrFlags, MountFlags, MoveMountFlags, UnmountFlags,
};

/// The mount syscalls the store needs, behind a trait so the store's compose/release logic
/// is testable without root ([`RecordingMounter`]); [`KernelMounter`] is the real thing.
pub trait Mounter: Send + Sync + std::fmt::Debug {
    /// Mounts `lower` (topmost first) with `upper`/`work` on `target`.
    fn mount_overlay(
        &self,
        lower: &[PathBuf],
        upper: &Path,
        work: &Path,
        target: &Path,
    ) -> Result<(), OverlayError>;
    /// Unmounts `target`; not mounted counts as done.
    fn unmount(&self, target: &Path) -> Result<(), OverlayError>;
    fn is_mounted(&self, target: &Path) -> bool;
}

/// Mounts for real (needs `CAP_SYS_ADMIN`).
#[derive(Debug, Default, Clone, Copy)]
pub struct KernelMounter;

impl Mounter for KernelMounter {
    fn mount_overlay(
        &self,
        lower: &[PathBuf],
        upper: &Path,
        work: &Path,
        target: &Path,
    ) -> Result<(), OverlayError> {
        mount_overlay(lower, upper, work, target)
    }
    fn unmount(&self, target: &Path) -> Result<(), OverlayError> {
        unmount(target)
    }
    fn is_mounted(&self, target: &Path) -> bool {
        is_mountpoint(target)
    }
}

/// One call a [`RecordingMounter`] saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountCall {
    Mount {
        lower: Vec<PathBuf>,
        upper: PathBuf,
        work: PathBuf,
        target: PathBuf,
    },
    Unmount {
        target: PathBuf,
    },
}

/// A fake that records calls and keeps a set of "mounted" targets; `fail_mount` makes every
/// mount fail with `EPERM`.
#[derive(Debug, Default)]
pub struct RecordingMounter {
    pub calls: std::sync::Mutex<Vec<MountCall>>,
    pub fail_mount: std::sync::atomic::AtomicBool,
    mounted: std::sync::Mutex<std::collections::HashSet<PathBuf>>,
}

impl RecordingMounter {
    pub fn calls(&self) -> Vec<MountCall> {
        self.calls.lock().map(|c| c.clone()).unwrap_or_default()
    }
}

impl Mounter for RecordingMounter {
    fn mount_overlay(
        &self,
        lower: &[PathBuf],
        upper: &Path,
        work: &Path,
        target: &Path,
    ) -> Result<(), OverlayError> {
        if let Ok(mut c) = self.calls.lock() {
            c.push(MountCall::Mount {
                lower: lower.to_vec(),
                upper: upper.to_owned(),
                work: work.to_owned(),
                target: target.to_owned(),
            });
        }
        if self.fail_mount.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(OverlayError::Mount {
                target: target.to_owned(),
                step: "fake",
                errno: Errno::PERM,
            });
        }
        if let Ok(mut m) = self.mounted.lock() {
            m.insert(target.to_owned());
        }
        Ok(())
    }
    fn unmount(&self, target: &Path) -> Result<(), OverlayError> {
        if let Ok(mut c) = self.calls.lock() {
            c.push(MountCall::Unmount {
                target: target.to_owned(),
            });
        }
        if let Ok(mut m) = self.mounted.lock() {
            m.remove(target);
        }
        Ok(())
    }
    fn is_mounted(&self, target: &Path) -> bool {
        self.mounted
            .lock()
            .map(|m| m.contains(target))
            .unwrap_or(false)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    #[error("mount overlay on {target}: {step}: {errno}")]
    Mount {
        target: PathBuf,
        step: &'static str,
        errno: Errno,
    },
    #[error(
        "mount overlay on {target}: path {path} cannot be an overlay option (contains ',' or ':' or is not utf-8)"
    )]
    BadPath { target: PathBuf, path: PathBuf },
    #[error(
        "mount overlay on {target}: {layers} layers do not fit in mount(2) options and this kernel lacks lowerdir+"
    )]
    TooManyLayers { target: PathBuf, layers: usize },
    #[error("unmount {target}: {errno}")]
    Unmount { target: PathBuf, errno: Errno },
}

/// Mounts `lower` (topmost first) with `upper`/`work` on `target`.
pub fn mount_overlay(
    lower: &[PathBuf],
    upper: &Path,
    work: &Path,
    target: &Path,
) -> Result<(), OverlayError> {
    let err = |step, errno| OverlayError::Mount {
        target: target.to_owned(),
        step,
        errno,
    };
    let opt = |p: &Path| -> Result<String, OverlayError> {
        match p.to_str() {
            // Commas and colons separate overlay options and layers; escaping them is
            // kernel-version dependent, so such paths are refused.
            Some(s) if !s.contains([',', ':']) => Ok(s.to_owned()),
            _ => Err(OverlayError::BadPath {
                target: target.to_owned(),
                path: p.to_owned(),
            }),
        }
    };
    let lower_s: Vec<String> = lower.iter().map(|p| opt(p)).collect::<Result<_, _>>()?;
    let (upper_s, work_s) = (opt(upper)?, opt(work)?);
    if lower_s.is_empty() {
        return Err(err("lowerdir", Errno::INVAL));
    }

    match fsopen_mount(&lower_s, &upper_s, &work_s, target) {
        Ok(()) => Ok(()),
        // No new mount API, or no lowerdir+ (kernel < 6.8): use mount(2).
        Err((_, Errno::NOSYS | Errno::INVAL)) => {
            let data = format!(
                "lowerdir={},upperdir={upper_s},workdir={work_s}",
                lower_s.join(":")
            );
            // The kernel copies at most one page of options.
            if data.len() >= 4096 {
                return Err(OverlayError::TooManyLayers {
                    target: target.to_owned(),
                    layers: lower.len(),
                });
            }
            let data = std::ffi::CString::new(data).map_err(|_| err("options", Errno::INVAL))?;
            rustix::mount::mount(
                "overlay",
                target,
                "overlay",
                MountFlags::NODEV,
                Some(data.as_c_str()),
            )
            .map_err(|e| err("mount", e))
        }
        Err((step, e)) => Err(err(step, e)),
    }
}

fn fsopen_mount(
    lower: &[String],
    upper: &str,
    work: &str,
    target: &Path,
) -> Result<(), (&'static str, Errno)> {
    let fs =
        rustix::mount::fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC).map_err(|e| ("fsopen", e))?;
    for l in lower {
        rustix::mount::fsconfig_set_string(&fs, "lowerdir+", l.as_str())
            .map_err(|e| ("lowerdir+", e))?;
    }
    rustix::mount::fsconfig_set_string(&fs, "upperdir", upper).map_err(|e| ("upperdir", e))?;
    rustix::mount::fsconfig_set_string(&fs, "workdir", work).map_err(|e| ("workdir", e))?;
    rustix::mount::fsconfig_create(&fs).map_err(|e| ("create", e))?;
    let mnt = rustix::mount::fsmount(
        &fs,
        FsMountFlags::FSMOUNT_CLOEXEC,
        MountAttrFlags::MOUNT_ATTR_NODEV,
    )
    .map_err(|e| ("fsmount", e))?;
    rustix::mount::move_mount(
        &mnt,
        "",
        rustix::fs::CWD,
        target,
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )
    .map_err(|e| ("move_mount", e))
}

/// Unmounts `target`. Not mounted (or missing) counts as done; a busy mount is detached
/// lazily so the instance can still be cleaned up.
pub fn unmount(target: &Path) -> Result<(), OverlayError> {
    if !is_mountpoint(target) {
        return Ok(());
    }
    match rustix::mount::unmount(target, UnmountFlags::NOFOLLOW) {
        Ok(()) | Err(Errno::INVAL | Errno::NOENT) => Ok(()),
        Err(Errno::BUSY) => {
            rustix::mount::unmount(target, UnmountFlags::DETACH | UnmountFlags::NOFOLLOW).map_err(
                |errno| OverlayError::Unmount {
                    target: target.to_owned(),
                    errno,
                },
            )
        }
        Err(errno) => Err(OverlayError::Unmount {
            target: target.to_owned(),
            errno,
        }),
    }
}

/// Whether `path` is a mount point, from /proc/self/mountinfo (a device-number comparison
/// misses an overlay that sits on the same device id as its parent only in theory, but
/// mountinfo is exact).
pub fn is_mountpoint(path: &Path) -> bool {
    let Ok(canon) = path.canonicalize() else {
        return false;
    };
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = canon.to_string_lossy();
    info.lines().any(|l| {
        l.split(' ')
            .nth(4)
            .is_some_and(|mp| unescape_mountinfo(mp) == want)
    })
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape_mountinfo(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}
