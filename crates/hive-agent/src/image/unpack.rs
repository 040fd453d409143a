//! Safe unpacking of one layer tarball into one directory.
//!
//! Owns the rules for what a layer may put on disk: every path is resolved component by
//! component from the layer root with `O_NOFOLLOW`, so nothing is ever written outside the
//! layer directory (no `..`, no absolute paths, no writes through a symlink planted earlier
//! in the same layer, no hard links whose target lies outside the layer). Device nodes from
//! the tarball are refused. OCI whiteouts become overlayfs whiteouts (a `0/0` character
//! device for `.wh.NAME`, the `trusted.overlay.opaque=y` xattr for `.wh..wh..opq`) because the
//! unpacked directory is used as-is as an overlayfs lower layer. The decompressed size and the
//! number of entries are bounded; on any error the partial directory is removed.
//!
//! It knows nothing about registries, digests of compressed blobs or the store's layout.

use std::cell::Cell;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Timespec, Timestamps, XattrFlags};
use rustix::io::Errno;

/// How a layer blob is compressed (from its media type).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

/// Bounds on what one layer may expand to.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Maximum decompressed tar stream size in bytes (headers included).
    pub max_bytes: u64,
    /// Maximum number of tar entries.
    pub max_entries: u64,
}

impl Default for Limits {
    fn default() -> Self {
        // Generous for real images (the largest common base images are a few GiB unpacked),
        // small enough that a bomb cannot fill a node's disk.
        Limits {
            max_bytes: 16 << 30,
            max_entries: 1_000_000,
        }
    }
}

/// What an unpack produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unpacked {
    /// `sha256:<hex>` of the decompressed tar stream (the OCI diff-id).
    pub diff_id: String,
    /// Decompressed bytes read.
    pub bytes: u64,
    /// Tar entries processed.
    pub entries: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("entry {path:?}: unsafe path: {reason}")]
    UnsafePath { path: String, reason: &'static str },
    #[error("entry {path:?}: device nodes are refused")]
    DeviceRefused { path: String },
    #[error("entry {path:?}: unsupported entry type {kind}")]
    Unsupported { path: String, kind: String },
    #[error("layer expands to more than {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("layer has more than {limit} bytes of tar headers between two entries")]
    MetadataTooLarge { limit: u64 },
    #[error("layer has more than {limit} entries")]
    TooManyEntries { limit: u64 },
    #[error("disk full writing {path:?}")]
    DiskFull { path: String },
    #[error("destination {0} already exists")]
    Exists(PathBuf),
    #[error("{path:?}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("malformed archive: {0}")]
    Archive(#[source] io::Error),
}

type Result<T, E = UnpackError> = std::result::Result<T, E>;

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";
/// The xattr (value `y`) that makes a directory opaque to overlayfs: what it holds hides the
/// same directory in the layers below.
pub(super) const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// Unpacks the layer read from `blob` into `dest`, which must not exist yet. On error `dest`
/// is removed again.
pub fn unpack_layer(
    blob: impl Read,
    compression: Compression,
    dest: &Path,
    limits: Limits,
) -> Result<Unpacked> {
    match std::fs::create_dir(dest) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            return Err(UnpackError::Exists(dest.to_owned()));
        }
        Err(e) => return Err(io_err(dest.display().to_string(), e)),
    }
    let result = unpack_into(blob, compression, dest, limits);
    if result.is_err() {
        // Best effort: the caller gets the unpack error, which is the one that matters.
        let _ = std::fs::remove_dir_all(dest);
    }
    result
}

fn unpack_into(
    blob: impl Read,
    compression: Compression,
    dest: &Path,
    limits: Limits,
) -> Result<Unpacked> {
    let decoder: Box<dyn Read> = match compression {
        Compression::None => Box::new(blob),
        // Concatenated gzip members are one valid stream (RFC 1952), as Go's reader used
        // by containerd and docker treats them.
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(blob)),
        Compression::Zstd => {
            Box::new(zstd::stream::read::Decoder::new(blob).map_err(UnpackError::Archive)?)
        }
    };
    let gap = Rc::new(Gap::default());
    let mut counted = Counted {
        inner: decoder,
        hasher: ring::digest::Context::new(&ring::digest::SHA256),
        bytes: 0,
        limit: limits.max_bytes,
        exceeded: false,
        gap: gap.clone(),
    };
    let root = rustix::fs::open(
        dest,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io_err(dest.display().to_string(), e.into()))?;

    let mut entries = 0u64;
    {
        let mut archive = tar::Archive::new(&mut counted);
        let iter = archive.entries().map_err(UnpackError::Archive)?;
        for entry in iter {
            let entry = match entry {
                Ok(e) => e,
                Err(e) => return Err(read_error(e, limits.max_bytes)),
            };
            gap.outside.set(0);
            entries += 1;
            if entries > limits.max_entries {
                return Err(UnpackError::TooManyEntries {
                    limit: limits.max_entries,
                });
            }
            apply_entry(&root, entry, limits.max_bytes, &gap)?;
        }
    }
    // The tar reader stops at the end-of-archive marker; the diff-id covers the whole stream,
    // including the trailing padding, so drain it (still bounded by the limit; draining
    // holds nothing in memory).
    gap.in_data.set(true);
    if let Err(e) = io::copy(&mut counted, &mut io::sink()) {
        return Err(read_error(e, limits.max_bytes));
    }
    if counted.exceeded {
        return Err(UnpackError::TooLarge {
            limit: limits.max_bytes,
        });
    }
    Ok(Unpacked {
        diff_id: format!("sha256:{}", hex::encode(counted.hasher.finish())),
        bytes: counted.bytes,
        entries,
    })
}

/// Marker put inside the io error the counting reader returns, so it can be recognised after
/// the tar crate wrapped it.
const LIMIT_MARKER: &str = "hive: layer size limit exceeded";
const META_MARKER: &str = "hive: tar metadata limit exceeded";

/// Bytes the tar reader may consume between two entries outside file contents: headers, PAX
/// records, GNU long names, padding. The tar crate buffers PAX records and long names whole in
/// memory, so without this bound a layer could declare a multi-GiB "name" and exhaust memory
/// while staying under the size limit. Real archives need a few KiB.
pub const MAX_METADATA_BYTES: u64 = 4 << 20;

/// Whether the reader is inside a file's contents, and how much it read outside them since
/// the last entry.
#[derive(Default)]
struct Gap {
    in_data: Cell<bool>,
    outside: Cell<u64>,
}

fn read_error(e: io::Error, limit: u64) -> UnpackError {
    let msg = e.to_string();
    if msg.contains(META_MARKER) {
        UnpackError::MetadataTooLarge {
            limit: MAX_METADATA_BYTES,
        }
    } else if msg.contains(LIMIT_MARKER) {
        UnpackError::TooLarge { limit }
    } else {
        UnpackError::Archive(e)
    }
}

/// Counts and hashes the decompressed stream and refuses to go past the limit.
struct Counted<R> {
    inner: R,
    hasher: ring::digest::Context,
    bytes: u64,
    limit: u64,
    exceeded: bool,
    gap: Rc<Gap>,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bytes += n as u64;
        if self.bytes > self.limit {
            self.exceeded = true;
            return Err(io::Error::other(LIMIT_MARKER));
        }
        if !self.gap.in_data.get() {
            let outside = self.gap.outside.get() + n as u64;
            self.gap.outside.set(outside);
            if outside > MAX_METADATA_BYTES {
                return Err(io::Error::other(META_MARKER));
            }
        }
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

fn io_err(path: String, e: io::Error) -> UnpackError {
    match e.raw_os_error() {
        Some(code)
            if code == Errno::NOSPC.raw_os_error() || code == Errno::DQUOT.raw_os_error() =>
        {
            UnpackError::DiskFull { path }
        }
        _ => UnpackError::Io { path, source: e },
    }
}

fn errno(path: &str, e: Errno) -> UnpackError {
    io_err(path.to_owned(), e.into())
}

/// Splits a tar path into its components, refusing anything that could leave the root.
/// Returns an empty vector for the root itself.
pub(crate) fn components(raw: &[u8]) -> Result<Vec<&str>> {
    let shown = || String::from_utf8_lossy(raw).into_owned();
    let s = std::str::from_utf8(raw).map_err(|_| UnpackError::UnsafePath {
        path: shown(),
        reason: "not utf-8",
    })?;
    let mut out = Vec::new();
    for c in s.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                return Err(UnsafePath(shown(), "parent directory component"));
            }
            c if c.contains('\0') => return Err(UnsafePath(shown(), "nul byte")),
            c => out.push(c),
        }
    }
    Ok(out)
}

#[allow(non_snake_case)]
fn UnsafePath(path: String, reason: &'static str) -> UnpackError {
    UnpackError::UnsafePath { path, reason }
}

fn dir_flags() -> OFlags {
    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
}

/// Opens the directory `parts` below `root` without following any symlink, creating missing
/// directories (mode 0755, owned by root) when `create` is set.
fn open_dir(root: &OwnedFd, parts: &[&str], create: bool, shown: &str) -> Result<OwnedFd> {
    let mut cur = root.try_clone().map_err(|e| io_err(shown.to_owned(), e))?;
    for part in parts {
        let next = match rustix::fs::openat(&cur, *part, dir_flags(), Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::NOENT) if create => {
                match rustix::fs::mkdirat(&cur, *part, Mode::from_raw_mode(0o755)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => return Err(errno(shown, e)),
                }
                rustix::fs::openat(&cur, *part, dir_flags(), Mode::empty())
                    .map_err(|e| walk_error(shown, e))?
            }
            Err(Errno::NOENT) => {
                return Err(UnsafePath(
                    shown.to_owned(),
                    "hard link target not in this layer",
                ));
            }
            Err(e) => return Err(walk_error(shown, e)),
        };
        cur = next;
    }
    Ok(cur)
}

fn walk_error(shown: &str, e: Errno) -> UnpackError {
    match e {
        // O_NOFOLLOW on a symlink gives ELOOP; a regular file in the middle gives ENOTDIR.
        Errno::LOOP | Errno::NOTDIR => {
            UnsafePath(shown.to_owned(), "a parent is a symlink or not a directory")
        }
        e => errno(shown, e),
    }
}

/// What currently sits at `name` in `dir`, without following symlinks.
fn existing(dir: &OwnedFd, name: &str, shown: &str) -> Result<Option<FileType>> {
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(FileType::from_raw_mode(st.st_mode))),
        Err(Errno::NOENT) => Ok(None),
        Err(e) => Err(errno(shown, e)),
    }
}

/// Removes a non-directory at `name` so a later entry of the same path replaces it (tar
/// semantics: the last entry wins). Replacing a directory with a non-directory is refused:
/// real layers never do it and it would need a recursive delete.
fn clear_for_non_dir(dir: &OwnedFd, name: &str, shown: &str) -> Result<()> {
    match existing(dir, name, shown)? {
        None => Ok(()),
        Some(FileType::Directory) => Err(UnsafePath(
            shown.to_owned(),
            "replaces a directory with a non-directory",
        )),
        Some(_) => rustix::fs::unlinkat(dir, name, AtFlags::empty()).map_err(|e| errno(shown, e)),
    }
}

fn apply_entry<R: Read>(
    root: &OwnedFd,
    mut entry: tar::Entry<'_, R>,
    max_bytes: u64,
    gap: &Gap,
) -> Result<()> {
    let raw_path = entry.path_bytes().into_owned();
    let shown = String::from_utf8_lossy(&raw_path).into_owned();
    let parts = components(&raw_path)?;
    let header = entry.header();
    let kind = header.entry_type();
    let Some((name, parents)) = parts.split_last() else {
        // The archive's root ("./"): the layer root already exists; its metadata would only
        // matter for the image's "/", which the first layer's own entry does not set usefully.
        return Ok(());
    };
    let name = *name;
    let mode = Mode::from_raw_mode(header.mode().map_err(UnpackError::Archive)? & 0o7777);
    let uid = header.uid().map_err(UnpackError::Archive)?;
    let gid = header.gid().map_err(UnpackError::Archive)?;
    let mtime = header.mtime().map_err(UnpackError::Archive)?;
    let owner = (
        Some(rustix::fs::Uid::from_raw(clamp_id(uid))),
        Some(rustix::fs::Gid::from_raw(clamp_id(gid))),
    );
    let times = Timestamps {
        last_access: Timespec {
            tv_sec: mtime as i64,
            tv_nsec: 0,
        },
        last_modification: Timespec {
            tv_sec: mtime as i64,
            tv_nsec: 0,
        },
    };

    let parent = open_dir(root, parents, true, &shown)?;

    if name == OPAQUE_MARKER {
        // The parent directory hides everything below it in lower layers.
        return rustix::fs::fsetxattr(&parent, OPAQUE_XATTR, b"y", XattrFlags::empty())
            .map_err(|e| errno(&shown, e));
    }
    if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
        if hidden.starts_with(WHITEOUT_PREFIX) || hidden.is_empty() {
            // Other AUFS metadata (.wh..wh.plnk, .wh..wh.aufs): meaningless here.
            return Ok(());
        }
        if hidden == "." || hidden == ".." {
            return Err(UnsafePath(shown, "whiteout of . or .."));
        }
        match existing(&parent, hidden, &shown)? {
            Some(FileType::Directory) => {
                return Err(UnsafePath(
                    shown,
                    "whiteout of a directory in the same layer",
                ));
            }
            Some(_) => {
                rustix::fs::unlinkat(&parent, hidden, AtFlags::empty())
                    .map_err(|e| errno(&shown, e))?;
            }
            None => {}
        }
        // overlayfs's whiteout: a character device with device number 0/0.
        return rustix::fs::mknodat(
            &parent,
            hidden,
            FileType::CharacterDevice,
            Mode::empty(),
            rustix::fs::makedev(0, 0),
        )
        .map_err(|e| errno(&shown, e));
    }

    match kind {
        tar::EntryType::Directory => {
            match existing(&parent, name, &shown)? {
                Some(FileType::Directory) => {}
                Some(_) => {
                    rustix::fs::unlinkat(&parent, name, AtFlags::empty())
                        .map_err(|e| errno(&shown, e))?;
                    mkdir(&parent, name, &shown)?;
                }
                None => mkdir(&parent, name, &shown)?,
            }
            let dir = rustix::fs::openat(&parent, name, dir_flags(), Mode::empty())
                .map_err(|e| walk_error(&shown, e))?;
            rustix::fs::fchown(&dir, owner.0, owner.1).map_err(|e| errno(&shown, e))?;
            rustix::fs::fchmod(&dir, mode).map_err(|e| errno(&shown, e))?;
            apply_xattrs(&mut entry, &dir, &shown)?;
        }
        tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
            clear_for_non_dir(&parent, name, &shown)?;
            let fd = rustix::fs::openat(
                &parent,
                name,
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )
            .map_err(|e| errno(&shown, e))?;
            let mut file = File::from(fd);
            gap.in_data.set(true);
            let copied = io::copy(&mut entry, &mut file);
            gap.in_data.set(false);
            if let Err(e) = copied {
                if e.to_string().contains(LIMIT_MARKER) {
                    return Err(UnpackError::TooLarge { limit: max_bytes });
                }
                if e.raw_os_error().is_some() {
                    return Err(io_err(shown, e));
                }
                return Err(UnpackError::Archive(e));
            }
            // chown before chmod: chown clears the set-id bits.
            rustix::fs::fchown(&file, owner.0, owner.1).map_err(|e| errno(&shown, e))?;
            rustix::fs::fchmod(&file, mode).map_err(|e| errno(&shown, e))?;
            apply_xattrs(&mut entry, &file.as_fd(), &shown)?;
            rustix::fs::futimens(&file, &times).map_err(|e| errno(&shown, e))?;
        }
        tar::EntryType::Symlink => {
            let target = entry
                .link_name_bytes()
                .ok_or_else(|| UnsafePath(shown.clone(), "symlink without target"))?
                .into_owned();
            clear_for_non_dir(&parent, name, &shown)?;
            // The target is not checked: it is resolved inside the container's root at run
            // time, and this unpacker never follows a symlink itself.
            rustix::fs::symlinkat(target.as_slice(), &parent, name)
                .map_err(|e| errno(&shown, e))?;
            rustix::fs::chownat(&parent, name, owner.0, owner.1, AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|e| errno(&shown, e))?;
            rustix::fs::utimensat(&parent, name, &times, AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|e| errno(&shown, e))?;
        }
        tar::EntryType::Link => {
            let target = entry
                .link_name_bytes()
                .ok_or_else(|| UnsafePath(shown.clone(), "hard link without target"))?
                .into_owned();
            let tparts = components(&target)?;
            let Some((tname, tparents)) = tparts.split_last() else {
                return Err(UnsafePath(shown, "hard link to the layer root"));
            };
            // The target must already be in this layer: it is looked up from the layer root
            // with the same no-symlink walk, so it cannot be outside.
            let tdir = open_dir(root, tparents, false, &shown)?;
            match existing(&tdir, tname, &shown)? {
                None => return Err(UnsafePath(shown, "hard link target not in this layer")),
                Some(FileType::Directory) => {
                    return Err(UnsafePath(shown, "hard link to a directory"));
                }
                Some(FileType::CharacterDevice | FileType::BlockDevice) => {
                    return Err(UnsafePath(shown, "hard link to a whiteout or device"));
                }
                Some(_) => {}
            }
            if parents == tparents && name == *tname {
                return Ok(());
            }
            clear_for_non_dir(&parent, name, &shown)?;
            rustix::fs::linkat(&tdir, *tname, &parent, name, AtFlags::empty())
                .map_err(|e| errno(&shown, e))?;
        }
        tar::EntryType::Fifo => {
            clear_for_non_dir(&parent, name, &shown)?;
            rustix::fs::mknodat(&parent, name, FileType::Fifo, mode, 0)
                .map_err(|e| errno(&shown, e))?;
            rustix::fs::chownat(&parent, name, owner.0, owner.1, AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|e| errno(&shown, e))?;
        }
        tar::EntryType::Char | tar::EntryType::Block => {
            return Err(UnpackError::DeviceRefused { path: shown });
        }
        // PAX and GNU long-name headers are consumed by the tar crate; these carry no file.
        tar::EntryType::XGlobalHeader | tar::EntryType::XHeader => {}
        other => {
            return Err(UnpackError::Unsupported {
                path: shown,
                kind: format!("{other:?}").to_lowercase(),
            });
        }
    }
    Ok(())
}

fn mkdir(parent: &OwnedFd, name: &str, shown: &str) -> Result<()> {
    rustix::fs::mkdirat(parent, name, Mode::from_raw_mode(0o755)).map_err(|e| errno(shown, e))
}

/// Ids beyond u32 cannot exist on Linux; map them to the overflow id instead of truncating
/// into a privileged one.
fn clamp_id(id: u64) -> u32 {
    u32::try_from(id).unwrap_or(65534)
}

/// Applies the PAX xattrs worth keeping. Only `security.capability` (file capabilities, e.g.
/// ping) and `user.*` are honoured; `trusted.*` is never taken from a tarball because
/// `trusted.overlay.*` would let a layer forge overlayfs metadata (opaque dirs, redirects).
fn apply_xattrs<R: Read, F: AsFd>(
    entry: &mut tar::Entry<'_, R>,
    fd: &F,
    shown: &str,
) -> Result<()> {
    let Some(exts) = entry.pax_extensions().map_err(UnpackError::Archive)? else {
        return Ok(());
    };
    for ext in exts {
        let ext = ext.map_err(UnpackError::Archive)?;
        let Ok(key) = ext.key() else { continue };
        let Some(name) = key.strip_prefix("SCHILY.xattr.") else {
            continue;
        };
        if name == "security.capability" || name.starts_with("user.") {
            rustix::fs::fsetxattr(fd, name, ext.value_bytes(), XattrFlags::empty())
                .map_err(|e| errno(shown, e))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};

    /// A tar built entry by entry, with raw header control so hostile names can be written.
    struct Tb {
        b: tar::Builder<Vec<u8>>,
    }

    impl Tb {
        fn new() -> Self {
            Tb {
                b: tar::Builder::new(Vec::new()),
            }
        }
        fn header(path: &str, kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
            let mut h = tar::Header::new_gnu();
            // set_path refuses `..`; write the raw name so hostile paths reach the unpacker.
            let name = path.as_bytes();
            let gnu = h.as_gnu_mut().expect("gnu header");
            gnu.name[..name.len()].copy_from_slice(name);
            h.set_entry_type(kind);
            h.set_size(size);
            h.set_mode(mode);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(1_700_000_000);
            h.set_cksum();
            h
        }
        fn file(mut self, path: &str, data: &[u8]) -> Self {
            let h = Self::header(path, tar::EntryType::Regular, data.len() as u64, 0o644);
            self.b.append(&h, data).expect("append");
            self
        }
        fn dir(mut self, path: &str) -> Self {
            let h = Self::header(path, tar::EntryType::Directory, 0, 0o755);
            self.b.append(&h, io::empty()).expect("append");
            self
        }
        fn link(mut self, path: &str, kind: tar::EntryType, target: &str) -> Self {
            let mut h = Self::header(path, kind, 0, 0o777);
            let t = target.as_bytes();
            h.as_gnu_mut().expect("gnu").linkname[..t.len()].copy_from_slice(t);
            h.set_cksum();
            self.b.append(&h, io::empty()).expect("append");
            self
        }
        fn node(mut self, path: &str, kind: tar::EntryType) -> Self {
            let mut h = Self::header(path, kind, 0, 0o600);
            h.set_device_major(1).expect("major");
            h.set_device_minor(3).expect("minor");
            h.set_cksum();
            self.b.append(&h, io::empty()).expect("append");
            self
        }
        fn finish(self) -> Vec<u8> {
            self.b.into_inner().expect("finish")
        }
    }

    fn unpack(tar: &[u8], limits: Limits) -> (tempfile::TempDir, PathBuf, Result<Unpacked>) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dest = tmp.path().join("layer");
        let r = unpack_layer(tar, Compression::None, &dest, limits);
        (tmp, dest, r)
    }

    fn assert_nothing_outside(tmp: &tempfile::TempDir) {
        let names: Vec<_> = std::fs::read_dir(tmp.path())
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert!(
            names.is_empty() || names == ["layer"],
            "unexpected files next to the layer: {names:?}"
        );
    }

    #[test]
    fn plain_layer_unpacks_with_metadata_and_diff_id() {
        let tar = Tb::new()
            .dir("bin/")
            .file("bin/hello", b"hi")
            .link("bin/sh", tar::EntryType::Symlink, "hello")
            .link("bin/hard", tar::EntryType::Link, "bin/hello")
            .file("./etc/deep/implicit", b"x")
            .finish();
        let (_tmp, dest, r) = unpack(&tar, Limits::default());
        let u = r.expect("unpack");
        assert_eq!(u.entries, 5);
        assert_eq!(
            u.diff_id,
            format!(
                "sha256:{}",
                hex::encode(ring::digest::digest(&ring::digest::SHA256, &tar))
            )
        );
        assert_eq!(std::fs::read(dest.join("bin/hello")).expect("read"), b"hi");
        let md = std::fs::metadata(dest.join("bin/hello")).expect("md");
        assert_eq!(md.permissions().mode() & 0o7777, 0o644);
        assert_eq!(md.mtime(), 1_700_000_000);
        assert_eq!(md.nlink(), 2);
        assert_eq!(
            std::fs::read_link(dest.join("bin/sh")).expect("link"),
            Path::new("hello")
        );
        assert!(dest.join("etc/deep/implicit").is_file());
    }

    #[test]
    fn gzip_and_zstd_layers() {
        let tar = Tb::new().file("a", b"hello").finish();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).expect("gz");
        let gz = gz.finish().expect("gz");
        let zs = zstd::stream::encode_all(tar.as_slice(), 3).expect("zstd");
        for (blob, c) in [(gz, Compression::Gzip), (zs, Compression::Zstd)] {
            let tmp = tempfile::tempdir().expect("tempdir");
            let dest = tmp.path().join("l");
            let u = unpack_layer(blob.as_slice(), c, &dest, Limits::default()).expect("unpack");
            assert_eq!(
                u.diff_id,
                format!(
                    "sha256:{}",
                    hex::encode(ring::digest::digest(&ring::digest::SHA256, &tar))
                )
            );
            assert_eq!(std::fs::read(dest.join("a")).expect("read"), b"hello");
        }
    }

    #[test]
    fn multi_member_gzip_is_one_stream() {
        let tar = Tb::new().file("a", b"1").file("b", b"2").finish();
        let (first, second) = tar.split_at(512 * 2);
        let mut blob = Vec::new();
        for part in [first, second] {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(part).expect("gz");
            blob.extend(gz.finish().expect("gz"));
        }
        let tmp = tempfile::tempdir().expect("tempdir");
        let dest = tmp.path().join("l");
        let u = unpack_layer(blob.as_slice(), Compression::Gzip, &dest, Limits::default())
            .expect("unpack");
        assert_eq!(u.entries, 2);
        assert_eq!(
            u.diff_id,
            format!(
                "sha256:{}",
                hex::encode(ring::digest::digest(&ring::digest::SHA256, &tar))
            )
        );
        assert_eq!(std::fs::read(dest.join("b")).expect("read"), b"2");
    }

    #[test]
    fn dotdot_is_refused_and_nothing_escapes() {
        let tar = Tb::new().file("../escape", b"x").finish();
        let (tmp, dest, r) = unpack(&tar, Limits::default());
        assert!(matches!(r, Err(UnpackError::UnsafePath { .. })), "{r:?}");
        assert!(!dest.exists(), "partial layer dir must be removed");
        assert_nothing_outside(&tmp);
        let tar = Tb::new().file("a/../../escape", b"x").finish();
        let (tmp, _, r) = unpack(&tar, Limits::default());
        assert!(matches!(r, Err(UnpackError::UnsafePath { .. })), "{r:?}");
        assert_nothing_outside(&tmp);
    }

    #[test]
    fn absolute_paths_stay_inside() {
        let tar = Tb::new().file("/abs/file", b"x").finish();
        let (_tmp, dest, r) = unpack(&tar, Limits::default());
        r.expect("unpack");
        assert!(dest.join("abs/file").is_file());
    }

    #[test]
    fn write_through_planted_symlink_is_refused() {
        let outside = tempfile::tempdir().expect("tempdir");
        let target = outside.path().to_str().expect("utf8").to_owned();
        let tar = Tb::new()
            .link("evil", tar::EntryType::Symlink, &target)
            .file("evil/pwned", b"x")
            .finish();
        let (_tmp, dest, r) = unpack(&tar, Limits::default());
        assert!(matches!(r, Err(UnpackError::UnsafePath { .. })), "{r:?}");
        assert!(!outside.path().join("pwned").exists());
        assert!(!dest.exists());
    }

    #[test]
    fn file_over_planted_symlink_replaces_the_link() {
        let outside = tempfile::tempdir().expect("tempdir");
        let victim = outside.path().join("victim");
        std::fs::write(&victim, b"safe").expect("write");
        let tar = Tb::new()
            .link(
                "evil",
                tar::EntryType::Symlink,
                victim.to_str().expect("utf8"),
            )
            .file("evil", b"pwned")
            .finish();
        let (_tmp, dest, r) = unpack(&tar, Limits::default());
        r.expect("unpack");
        assert_eq!(std::fs::read(&victim).expect("read"), b"safe");
        assert_eq!(std::fs::read(dest.join("evil")).expect("read"), b"pwned");
    }

    #[test]
    fn hard_link_outside_is_refused() {
        let outside = tempfile::tempdir().expect("tempdir");
        std::fs::write(outside.path().join("secret"), b"s").expect("write");
        let abs = outside.path().join("secret");
        for target in ["../secret", abs.to_str().expect("utf8"), "missing"] {
            let tar = Tb::new().link("l", tar::EntryType::Link, target).finish();
            let (tmp, _, r) = unpack(&tar, Limits::default());
            assert!(
                matches!(r, Err(UnpackError::UnsafePath { .. })),
                "{target}: {r:?}"
            );
            assert_nothing_outside(&tmp);
        }
        // Through a symlink planted in the same layer.
        let tar = Tb::new()
            .link(
                "d",
                tar::EntryType::Symlink,
                outside.path().to_str().expect("utf8"),
            )
            .link("l", tar::EntryType::Link, "d/secret")
            .finish();
        let (_tmp, _, r) = unpack(&tar, Limits::default());
        assert!(matches!(r, Err(UnpackError::UnsafePath { .. })), "{r:?}");
        assert_eq!(std::fs::metadata(&abs).expect("md").nlink(), 1);
    }

    #[test]
    fn device_nodes_are_refused() {
        for kind in [tar::EntryType::Char, tar::EntryType::Block] {
            let tar = Tb::new().node("dev/null", kind).finish();
            let (_tmp, dest, r) = unpack(&tar, Limits::default());
            assert!(matches!(r, Err(UnpackError::DeviceRefused { .. })), "{r:?}");
            assert!(!dest.exists());
        }
        let tar = Tb::new().node("fifo", tar::EntryType::Fifo).finish();
        let (_tmp, dest, r) = unpack(&tar, Limits::default());
        r.expect("fifos are allowed");
        assert!(
            std::fs::symlink_metadata(dest.join("fifo"))
                .expect("md")
                .file_type()
                .is_fifo()
        );
    }

    #[test]
    fn whiteouts_become_overlay_whiteouts() {
        let tar = Tb::new()
            .dir("etc/")
            .file("etc/.wh.gone", b"")
            .dir("opaque/")
            .file("opaque/.wh..wh..opq", b"")
            .file("opaque/kept", b"k")
            .file(".wh..wh.plnk", b"")
            .finish();
        let (_tmp, dest, r) = unpack(&tar, Limits::default());
        r.expect("unpack");
        let md = std::fs::symlink_metadata(dest.join("etc/gone")).expect("whiteout");
        assert!(md.file_type().is_char_device());
        assert_eq!(md.rdev(), 0);
        assert!(!dest.join("etc/.wh.gone").exists());
        let mut buf = [0u8; 8];
        let n = rustix::fs::lgetxattr(dest.join("opaque"), "trusted.overlay.opaque", &mut buf)
            .expect("opaque xattr");
        assert_eq!(&buf[..n], b"y");
        assert!(!dest.join("opaque/.wh..wh..opq").exists());
        assert!(dest.join("opaque/kept").is_file());
        assert!(!dest.join(".wh..wh.plnk").exists());
    }

    #[test]
    fn whiteout_names_cannot_escape() {
        let tar = Tb::new().file(".wh..", b"").finish();
        let (_tmp, _, r) = unpack(&tar, Limits::default());
        assert!(matches!(r, Err(UnpackError::UnsafePath { .. })), "{r:?}");
    }

    #[test]
    fn trusted_xattrs_from_the_tar_are_ignored() {
        let mut b = tar::Builder::new(Vec::new());
        b.append_pax_extensions([("SCHILY.xattr.trusted.overlay.opaque", b"y".as_slice())])
            .expect("pax");
        let mut h = tar::Header::new_ustar();
        h.set_path("d").expect("path");
        h.set_entry_type(tar::EntryType::Directory);
        h.set_size(0);
        h.set_mode(0o755);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_cksum();
        b.append(&h, io::empty()).expect("append");
        let tar = b.into_inner().expect("tar");
        let (_tmp, dest, r) = unpack(&tar, Limits::default());
        r.expect("unpack");
        let mut buf = [0u8; 8];
        assert!(rustix::fs::lgetxattr(dest.join("d"), "trusted.overlay.opaque", &mut buf).is_err());
    }

    #[test]
    fn gzip_bomb_fails_cleanly() {
        // 64 MiB of zeros in one file compresses to ~64 KiB.
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        {
            let mut b = tar::Builder::new(&mut gz);
            let mut h = tar::Header::new_gnu();
            h.set_path("zeros").expect("path");
            h.set_size(64 << 20);
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_cksum();
            b.append(&h, io::repeat(0).take(64 << 20)).expect("append");
            b.finish().expect("finish");
        }
        let blob = gz.finish().expect("gz");
        assert!(blob.len() < 1 << 20);
        let tmp = tempfile::tempdir().expect("tempdir");
        let dest = tmp.path().join("l");
        let limits = Limits {
            max_bytes: 1 << 20,
            max_entries: 10,
        };
        let r = unpack_layer(blob.as_slice(), Compression::Gzip, &dest, limits);
        assert!(
            matches!(r, Err(UnpackError::TooLarge { limit }) if limit == 1 << 20),
            "{r:?}"
        );
        assert!(!dest.exists());
    }

    #[test]
    fn huge_pax_header_is_refused_before_it_is_buffered() {
        let mut b = tar::Builder::new(Vec::new());
        let long = "a".repeat(8 << 20);
        b.append_pax_extensions([("comment", long.as_bytes())])
            .expect("pax");
        let tar = b.into_inner().expect("tar");
        let (_tmp, dest, r) = unpack(&tar, Limits::default());
        assert!(
            matches!(r, Err(UnpackError::MetadataTooLarge { .. })),
            "{r:?}"
        );
        assert!(!dest.exists());
        // Large file contents are not metadata.
        let tar = Tb::new().file("big", &vec![1u8; 6 << 20]).finish();
        let (_tmp, _, r) = unpack(&tar, Limits::default());
        r.expect("a 6 MiB file is fine");
    }

    #[test]
    fn too_many_entries_fails() {
        let mut t = Tb::new();
        for i in 0..20 {
            t = t.file(&format!("f{i}"), b"");
        }
        let limits = Limits {
            max_bytes: 1 << 30,
            max_entries: 10,
        };
        let (_tmp, dest, r) = unpack(&t.finish(), limits);
        assert!(
            matches!(r, Err(UnpackError::TooManyEntries { limit: 10 })),
            "{r:?}"
        );
        assert!(!dest.exists());
    }

    #[test]
    fn garbage_is_an_archive_error() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dest = tmp.path().join("l");
        let r = unpack_layer(
            &b"not gzip at all"[..],
            Compression::Gzip,
            &dest,
            Limits::default(),
        );
        assert!(matches!(r, Err(UnpackError::Archive(_))), "{r:?}");
        assert!(!dest.exists());
    }

    #[test]
    fn existing_destination_is_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let r = unpack_layer(&b""[..], Compression::None, tmp.path(), Limits::default());
        assert!(matches!(r, Err(UnpackError::Exists(_))), "{r:?}");
        assert!(tmp.path().exists());
    }

    /// Unmounts the test's tmpfs even if an assertion fails.
    struct Tmpfs(PathBuf);
    impl Drop for Tmpfs {
        fn drop(&mut self) {
            let _ = rustix::mount::unmount(&self.0, rustix::mount::UnmountFlags::DETACH);
        }
    }

    #[test]
    fn disk_full_is_its_own_error() {
        assert!(
            rustix::process::geteuid().is_root(),
            "this test mounts a small tmpfs and must run as root"
        );
        let tmp = tempfile::tempdir().expect("tempdir");
        let mnt = tmp.path().join("mnt");
        std::fs::create_dir(&mnt).expect("mkdir");
        rustix::mount::mount(
            "hive-test",
            &mnt,
            "tmpfs",
            rustix::mount::MountFlags::empty(),
            Some(c"size=256k"),
        )
        .expect("mount tmpfs");
        let _guard = Tmpfs(mnt.clone());
        let tar = Tb::new().file("big", &vec![7u8; 1 << 20]).finish();
        let dest = mnt.join("layer");
        let r = unpack_layer(tar.as_slice(), Compression::None, &dest, Limits::default());
        assert!(
            matches!(&r, Err(UnpackError::DiskFull { path }) if path == "big"),
            "{r:?}"
        );
        assert!(!dest.exists(), "partial layer dir must be removed");
    }

    /// A cheap, deterministic stand-in for the fuzz target (which needs nightly): mutated
    /// tarballs full of hostile entries must never panic and never write outside the layer.
    #[test]
    fn mutated_archives_never_escape() {
        let outside = tempfile::tempdir().expect("tempdir");
        let out = outside.path().to_str().expect("utf8").to_owned();
        let seed = Tb::new()
            .dir("d/")
            .link("d/up", tar::EntryType::Symlink, "..")
            .link("abs", tar::EntryType::Symlink, &out)
            .file("d/f", b"data")
            .link("d/h", tar::EntryType::Link, "d/f")
            .file("d/.wh.f", b"")
            .file("d/.wh..wh..opq", b"")
            .node("fifo", tar::EntryType::Fifo)
            .file("abs/x", b"x")
            .finish();
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let names: [&[u8]; 6] = [b"..", b"abs", b"d/up", b"/", b"d/up/x", b".wh..."];
        for _ in 0..400 {
            let mut t = seed.clone();
            for _ in 0..(next() % 6 + 1) {
                let pos = (next() as usize) % t.len();
                match next() % 3 {
                    0 => t[pos] = next() as u8,
                    1 => {
                        // Overwrite a header name with a hostile path.
                        let block = pos / 512 * 512;
                        let n = names[(next() as usize) % names.len()];
                        t[block..block + 100].fill(0);
                        t[block..block + n.len()].copy_from_slice(n);
                    }
                    _ => t[pos] = b'/',
                }
            }
            let tmp = tempfile::tempdir().expect("tempdir");
            let dest = tmp.path().join("layer");
            let r = unpack_layer(t.as_slice(), Compression::None, &dest, Limits::default());
            assert_nothing_outside(&tmp);
            assert_eq!(
                std::fs::read_dir(outside.path()).expect("outside").count(),
                0,
                "wrote outside the layer"
            );
            if r.is_err() {
                assert!(!dest.exists());
            }
        }
    }
}
