//! OCI image layouts (the image spec's `oci-layout` + `index.json` + `blobs/sha256/…`): read
//! from a directory or from a tar archive of one (optionally gzip), and written by `hive pull`.
//!
//! Reading never unpacks an archive to disk: an uncompressed tar is read in place (each blob is
//! a byte range of the archive, see [`FileRange`]); a gzip one is decompressed once into an
//! unlinked temporary file, gone when the reader is. Writing publishes a blob by rename only
//! after it verified, and `index.json` last, so a failed pull leaves no partial blob and no
//! reference to a missing one. Knows nothing of registries.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use super::registry::{FileRange, MAX_SMALL_BLOB, sha256_of};

/// The annotation naming an image in `index.json` (a tag, for `hive push` and `hive pull`).
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
pub const LAYOUT_VERSION: &str = "1.0.0";

/// A content descriptor. Fields other than these (`platform`, `urls`, `artifactType`…) are
/// kept as they are when a layout is rewritten.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Descriptor {
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

impl Descriptor {
    pub fn new(media_type: &str, digest: &str, size: u64) -> Self {
        Descriptor {
            media_type: media_type.to_owned(),
            digest: digest.to_owned(),
            size,
            annotations: BTreeMap::new(),
            other: serde_json::Map::new(),
        }
    }

    /// The image's name in a layout's `index.json`.
    pub fn ref_name(&self) -> Option<&str> {
        self.annotations.get(REF_NAME).map(String::as_str)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("open image layout {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not an OCI image layout: {reason}")]
    NotALayout { path: String, reason: String },
    #[error("{path}: index.json has no image named {name:?} (it has: {available})")]
    NoSuchName {
        path: String,
        name: String,
        available: String,
    },
    #[error("{path}: index.json has {count} images, name one as {path}:NAME (it has: {available})")]
    Ambiguous {
        path: String,
        count: usize,
        available: String,
    },
    #[error("{path}: index.json has no image")]
    Empty { path: String },
    #[error("{path}: blob {digest} is missing")]
    MissingBlob { path: String, digest: String },
    #[error("{path}: blob {digest}: {reason}")]
    BadBlob {
        path: String,
        digest: String,
        reason: String,
    },
}

type Result<T, E = LayoutError> = std::result::Result<T, E>;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> LayoutError + '_ {
    move |source| LayoutError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// `sha256:` and 64 lower-case hex digits: the only digests that become file names here.
pub fn valid_digest(d: &str) -> bool {
    d.strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
}

/// Splits `PATH[:NAME]`: the whole of `s` when it exists, else what follows the last `:` is
/// the image's name in the layout (`org.opencontainers.image.ref.name`).
pub fn split_source(s: &str) -> (PathBuf, Option<String>) {
    if Path::new(s).exists() {
        return (PathBuf::from(s), None);
    }
    match s.rsplit_once(':') {
        Some((path, name)) if !path.is_empty() && !name.is_empty() && !name.contains('/') => {
            (PathBuf::from(path), Some(name.to_owned()))
        }
        _ => (PathBuf::from(s), None),
    }
}

/// `index.json`: the descriptors, and whatever else it holds (kept on rewrite).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Index {
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    #[serde(default)]
    manifests: Vec<Descriptor>,
    #[serde(flatten)]
    other: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Deserialize)]
struct LayoutFile {
    #[serde(rename = "imageLayoutVersion")]
    version: String,
}

fn check_layout_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let not_layout = |reason: String| LayoutError::NotALayout {
        path: path.display().to_string(),
        reason,
    };
    let f: LayoutFile = serde_json::from_slice(bytes)
        .map_err(|e| not_layout(format!("bad oci-layout file: {e}")))?;
    if f.version.split('.').next() != Some("1") {
        return Err(not_layout(format!(
            "image layout version {} (only 1.x)",
            f.version
        )));
    }
    Ok(())
}

fn parse_index(path: &Path, bytes: &[u8]) -> Result<Index> {
    let index: Index = serde_json::from_slice(bytes).map_err(|e| LayoutError::NotALayout {
        path: path.display().to_string(),
        reason: format!("bad index.json: {e}"),
    })?;
    if let Some(d) = index.manifests.iter().find(|d| !valid_digest(&d.digest)) {
        return Err(LayoutError::NotALayout {
            path: path.display().to_string(),
            reason: format!(
                "index.json: unsupported digest {:?} (only sha256)",
                d.digest
            ),
        });
    }
    Ok(index)
}

/// Where a layout's files are.
#[derive(Debug)]
enum Files {
    Dir(PathBuf),
    /// Regular files of a tar by their path inside the layout: (offset, length) in `file`.
    Archive {
        file: Arc<File>,
        entries: HashMap<String, (u64, u64)>,
    },
}

/// An OCI layout opened for reading.
#[derive(Debug)]
pub struct LayoutReader {
    path: PathBuf,
    files: Files,
    index: Index,
}

impl LayoutReader {
    /// Opens a layout directory, or a tar (or tar.gz) archive of one. The archive's layout may
    /// be at its root or in one directory (`tar cf x.tar mylayout/`).
    pub fn open(path: &Path) -> Result<Self> {
        let meta = std::fs::metadata(path).map_err(|source| LayoutError::Open {
            path: path.display().to_string(),
            source,
        })?;
        let files = if meta.is_dir() {
            Files::Dir(path.to_owned())
        } else {
            open_archive(path)?
        };
        let mut reader = LayoutReader {
            path: path.to_owned(),
            files,
            index: Index {
                schema_version: 2,
                manifests: Vec::new(),
                other: serde_json::Map::new(),
            },
        };
        let missing = |name: &str| LayoutError::NotALayout {
            path: path.display().to_string(),
            reason: format!("no {name} file"),
        };
        let layout = reader
            .small_file("oci-layout")?
            .ok_or_else(|| missing("oci-layout"))?;
        check_layout_file(path, &layout)?;
        let index = reader
            .small_file("index.json")?
            .ok_or_else(|| missing("index.json"))?;
        reader.index = parse_index(path, &index)?;
        Ok(reader)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The images `index.json` lists.
    pub fn images(&self) -> &[Descriptor] {
        &self.index.manifests
    }

    /// The image named `name`, or the only one when `name` is `None`.
    pub fn select(&self, name: Option<&str>) -> Result<Descriptor> {
        let path = self.path.display().to_string();
        let images = &self.index.manifests;
        let available = || {
            images
                .iter()
                .map(|d| match d.ref_name() {
                    Some(n) => n.to_owned(),
                    None => format!("unnamed {}", d.digest),
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        match name {
            Some(name) => images
                .iter()
                .find(|d| d.ref_name() == Some(name))
                .cloned()
                .ok_or_else(|| LayoutError::NoSuchName {
                    path,
                    name: name.to_owned(),
                    available: available(),
                }),
            None => match images.as_slice() {
                [] => Err(LayoutError::Empty { path }),
                [one] => Ok(one.clone()),
                more => Err(LayoutError::Ambiguous {
                    path,
                    count: more.len(),
                    available: available(),
                }),
            },
        }
    }

    /// Where the blob's bytes are, checked against the descriptor's size (not yet its
    /// digest: that is checked as the bytes are read).
    pub fn blob(&self, d: &Descriptor) -> Result<FileRange> {
        let bad = |reason: String| LayoutError::BadBlob {
            path: self.path.display().to_string(),
            digest: d.digest.clone(),
            reason,
        };
        let Some(hex) = d
            .digest
            .strip_prefix("sha256:")
            .filter(|_| valid_digest(&d.digest))
        else {
            return Err(bad("unsupported digest (only sha256)".into()));
        };
        let name = format!("blobs/sha256/{hex}");
        let range = match &self.files {
            Files::Dir(dir) => {
                let p = dir.join(&name);
                match File::open(&p) {
                    Ok(f) => {
                        let len = f.metadata().map_err(io_err(&p))?.len();
                        Some(FileRange {
                            file: Arc::new(f),
                            offset: 0,
                            len,
                        })
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                    Err(e) => return Err(io_err(&p)(e)),
                }
            }
            Files::Archive { file, entries } => {
                entries.get(&name).map(|&(offset, len)| FileRange {
                    file: file.clone(),
                    offset,
                    len,
                })
            }
        };
        let range = range.ok_or_else(|| LayoutError::MissingBlob {
            path: self.path.display().to_string(),
            digest: d.digest.clone(),
        })?;
        if range.len != d.size {
            return Err(bad(format!(
                "{} bytes, its descriptor says {}",
                range.len, d.size
            )));
        }
        Ok(range)
    }

    /// A manifest, index or config: read whole and verified against its digest.
    pub fn read_small(&self, d: &Descriptor) -> Result<Vec<u8>> {
        let bad = |reason: String| LayoutError::BadBlob {
            path: self.path.display().to_string(),
            digest: d.digest.clone(),
            reason,
        };
        if d.size > MAX_SMALL_BLOB {
            return Err(bad(format!(
                "{} bytes, more than a manifest may have ({MAX_SMALL_BLOB})",
                d.size
            )));
        }
        let range = self.blob(d)?;
        let bytes = read_range(&range).map_err(io_err(&self.path))?;
        let actual = sha256_of(&bytes);
        if actual != d.digest {
            return Err(bad(format!("content has digest {actual}")));
        }
        Ok(bytes)
    }

    /// A small file of the layout (`oci-layout`, `index.json`); `None` when absent.
    fn small_file(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let range = match &self.files {
            Files::Dir(dir) => {
                let p = dir.join(name);
                let f = match File::open(&p) {
                    Ok(f) => f,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => return Err(io_err(&p)(e)),
                };
                let len = f.metadata().map_err(io_err(&p))?.len();
                FileRange {
                    file: Arc::new(f),
                    offset: 0,
                    len,
                }
            }
            Files::Archive { file, entries } => match entries.get(name) {
                Some(&(offset, len)) => FileRange {
                    file: file.clone(),
                    offset,
                    len,
                },
                None => return Ok(None),
            },
        };
        if range.len > MAX_SMALL_BLOB {
            return Err(LayoutError::NotALayout {
                path: self.path.display().to_string(),
                reason: format!("{name} is larger than {MAX_SMALL_BLOB} bytes"),
            });
        }
        read_range(&range).map(Some).map_err(io_err(&self.path))
    }
}

fn read_range(r: &FileRange) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0; r.len as usize];
    r.file.read_exact_at(&mut buf, r.offset)?;
    Ok(buf)
}

static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// Indexes a tar (decompressing a gzip one into an unlinked temporary file first).
fn open_archive(path: &Path) -> Result<Files> {
    let not_layout = |reason: String| LayoutError::NotALayout {
        path: path.display().to_string(),
        reason,
    };
    let mut file = File::open(path).map_err(io_err(path))?;
    let mut magic = [0u8; 2];
    let n = file.read(&mut magic).map_err(io_err(path))?;
    file.rewind().map_err(io_err(path))?;
    if n == 2 && magic == [0x1f, 0x8b] {
        let tmp = std::env::temp_dir().join(format!(
            "hive-archive-{}-{}",
            std::process::id(),
            TMP_SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let mut out = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io_err(&tmp))?;
        // Unlinked at once: the open file is all there is, and it goes with this process.
        std::fs::remove_file(&tmp).map_err(io_err(&tmp))?;
        let mut gz = flate2::read::MultiGzDecoder::new(std::io::BufReader::new(file));
        std::io::copy(&mut gz, &mut out)
            .map_err(|e| not_layout(format!("gzip archive could not be read: {e}")))?;
        out.flush().map_err(io_err(path))?;
        out.rewind().map_err(io_err(path))?;
        file = out;
    }
    let mut entries = HashMap::new();
    {
        let mut archive = tar::Archive::new(&file);
        let bad_tar = |e: std::io::Error| not_layout(format!("not a tar archive: {e}"));
        for entry in archive.entries_with_seek().map_err(bad_tar)? {
            let entry = entry.map_err(bad_tar)?;
            if !entry.header().entry_type().is_file() {
                continue;
            }
            let Some(name) = entry.path().ok().and_then(|p| normal_path(&p)) else {
                continue;
            };
            entries.insert(name, (entry.raw_file_position(), entry.size()));
        }
    }
    // The layout is at the archive's root, or in the least deep directory holding an
    // `oci-layout` file.
    let prefix = entries
        .keys()
        .filter_map(|k| {
            (k == "oci-layout")
                .then_some("")
                .or_else(|| k.strip_suffix("/oci-layout").map(|_| &k[..k.len() - 10]))
        })
        .min_by_key(|p| (p.matches('/').count(), p.len()))
        .map(str::to_owned)
        .ok_or_else(|| not_layout("the archive has no oci-layout file".into()))?;
    let entries = entries
        .into_iter()
        .filter_map(|(k, v)| k.strip_prefix(&prefix).map(|k| (k.to_owned(), v)))
        .collect();
    Ok(Files::Archive {
        file: Arc::new(file),
        entries,
    })
}

/// A tar entry's path as `a/b/c`, without `./`; `None` for `..` and absolute paths.
fn normal_path(p: &Path) -> Option<String> {
    let mut parts = Vec::new();
    for c in p.components() {
        match c {
            Component::Normal(s) => parts.push(s.to_str()?),
            Component::CurDir => {}
            _ => return None,
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

/// An OCI layout being written. Blobs go to a private temporary directory inside the
/// layout first (removed when the writer is dropped) and are renamed into `blobs/` whole.
#[derive(Debug)]
pub struct LayoutWriter {
    root: PathBuf,
    tmp: PathBuf,
}

impl LayoutWriter {
    /// Opens the layout at `root`, making it (and `oci-layout`) if needed. An existing
    /// layout must be one (version 1.x, a readable `index.json`): this is checked before
    /// anything is written.
    pub fn create(root: &Path) -> Result<Self> {
        match std::fs::metadata(root) {
            Ok(m) if !m.is_dir() => {
                return Err(LayoutError::NotALayout {
                    path: root.display().to_string(),
                    reason: "not a directory".into(),
                });
            }
            _ => {}
        }
        let layout_file = root.join("oci-layout");
        match std::fs::read(&layout_file) {
            Ok(bytes) => check_layout_file(root, &bytes)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&layout_file)(e)),
        }
        let index = root.join("index.json");
        match std::fs::read(&index) {
            Ok(bytes) => {
                parse_index(root, &bytes)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&index)(e)),
        }
        let blobs = root.join("blobs/sha256");
        std::fs::create_dir_all(&blobs).map_err(io_err(&blobs))?;
        let tmp = root.join(format!(
            ".hive-tmp-{}-{}",
            std::process::id(),
            TMP_SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&tmp).map_err(io_err(&tmp))?;
        let writer = LayoutWriter {
            root: root.to_owned(),
            tmp,
        };
        if !layout_file.exists() {
            let body = format!("{{\"imageLayoutVersion\":\"{LAYOUT_VERSION}\"}}");
            writer.write_atomic(&layout_file, body.as_bytes())?;
        }
        Ok(writer)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn blob_path(&self, digest: &str) -> PathBuf {
        self.root
            .join("blobs/sha256")
            .join(digest.strip_prefix("sha256:").unwrap_or(digest))
    }

    /// Whether the layout has the blob (a file of the right size: blobs are only ever
    /// published whole and verified).
    pub fn has_blob(&self, d: &Descriptor) -> bool {
        valid_digest(&d.digest)
            && std::fs::metadata(self.blob_path(&d.digest)).is_ok_and(|m| m.len() == d.size)
    }

    /// A fresh temporary path for the blob's download.
    pub fn temp_path(&self, digest: &str) -> PathBuf {
        self.tmp.join(format!(
            "{}-{}",
            digest.strip_prefix("sha256:").unwrap_or(digest),
            TMP_SEQ.fetch_add(1, Ordering::Relaxed)
        ))
    }

    /// Moves a verified download into `blobs/`.
    pub fn publish(&self, temp: &Path, digest: &str) -> Result<()> {
        if !valid_digest(digest) {
            return Err(LayoutError::BadBlob {
                path: self.root.display().to_string(),
                digest: digest.to_owned(),
                reason: "unsupported digest (only sha256)".into(),
            });
        }
        let to = self.blob_path(digest);
        std::fs::rename(temp, &to).map_err(io_err(&to))
    }

    /// Writes a small blob held in memory, after checking it against `digest`.
    pub fn write_blob(&self, digest: &str, bytes: &[u8]) -> Result<()> {
        let actual = sha256_of(bytes);
        if actual != digest {
            return Err(LayoutError::BadBlob {
                path: self.root.display().to_string(),
                digest: digest.to_owned(),
                reason: format!("content has digest {actual}"),
            });
        }
        let temp = self.temp_path(digest);
        write_synced(&temp, bytes)?;
        self.publish(&temp, digest)
    }

    /// Lists the image in `index.json`, replacing the image of the same name (or, for an
    /// unnamed one, the same digest unnamed).
    pub fn add_image(&self, image: Descriptor) -> Result<()> {
        let path = self.root.join("index.json");
        let mut index = match std::fs::read(&path) {
            Ok(bytes) => parse_index(&self.root, &bytes)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Index {
                schema_version: 2,
                manifests: Vec::new(),
                other: serde_json::Map::new(),
            },
            Err(e) => return Err(io_err(&path)(e)),
        };
        if !index.other.contains_key("mediaType") {
            index.other.insert(
                "mediaType".into(),
                "application/vnd.oci.image.index.v1+json".into(),
            );
        }
        index.manifests.retain(|d| match image.ref_name() {
            Some(name) => d.ref_name() != Some(name),
            None => d.ref_name().is_some() || d.digest != image.digest,
        });
        index.manifests.push(image);
        let bytes = serde_json::to_vec_pretty(&index).map_err(|e| LayoutError::Io {
            path: path.display().to_string(),
            source: std::io::Error::other(e),
        })?;
        self.write_atomic(&path, &bytes)
    }

    fn write_atomic(&self, to: &Path, bytes: &[u8]) -> Result<()> {
        let temp = self
            .tmp
            .join(format!("file-{}", TMP_SEQ.fetch_add(1, Ordering::Relaxed)));
        write_synced(&temp, bytes)?;
        std::fs::rename(&temp, to).map_err(io_err(to))
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).map_err(io_err(path))?;
    f.write_all(bytes).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

impl Drop for LayoutWriter {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.tmp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

    /// A layout with two named images (blob contents are arbitrary: only digests matter).
    fn sample(dir: &Path) -> (Descriptor, Descriptor) {
        std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        let mut descs = Vec::new();
        for (name, body) in [("v1", "one"), ("v2", "two!")] {
            let digest = sha256_of(body.as_bytes());
            std::fs::write(dir.join("blobs/sha256").join(&digest[7..]), body.as_bytes()).unwrap();
            let mut d = Descriptor::new(MANIFEST, &digest, body.len() as u64);
            d.annotations.insert(REF_NAME.into(), name.into());
            d.other
                .insert("platform".into(), serde_json::json!({"os": "linux"}));
            descs.push(d);
        }
        let index = serde_json::json!({"schemaVersion": 2, "manifests": descs});
        std::fs::write(dir.join("index.json"), index.to_string()).unwrap();
        (descs[0].clone(), descs[1].clone())
    }

    #[test]
    fn reads_a_layout_directory_and_selects_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let (v1, v2) = sample(dir.path());
        let l = LayoutReader::open(dir.path()).unwrap();
        assert_eq!(l.images().len(), 2);
        assert_eq!(l.select(Some("v2")).unwrap(), v2);
        // Unknown fields (platform) survive parsing.
        assert_eq!(
            l.select(Some("v1")).unwrap().other["platform"]["os"],
            "linux"
        );
        assert_eq!(l.read_small(&v1).unwrap(), b"one");
        let e = l.select(None).unwrap_err().to_string();
        assert!(e.contains("has 2 images") && e.contains("v1, v2"), "{e}");
        let e = l.select(Some("v3")).unwrap_err().to_string();
        assert!(
            e.contains("no image named \"v3\"") && e.contains("v1, v2"),
            "{e}"
        );
    }

    #[test]
    fn refuses_what_is_not_a_layout_or_does_not_verify() {
        let dir = tempfile::tempdir().unwrap();
        let e = LayoutReader::open(&dir.path().join("nope")).unwrap_err();
        assert!(matches!(e, LayoutError::Open { .. }), "{e}");
        let e = LayoutReader::open(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("not an OCI image layout: no oci-layout file"),
            "{e}"
        );

        let (v1, v2) = sample(dir.path());
        std::fs::write(dir.path().join("blobs/sha256").join(&v1.digest[7..]), "ONE").unwrap();
        std::fs::remove_file(dir.path().join("blobs/sha256").join(&v2.digest[7..])).unwrap();
        let l = LayoutReader::open(dir.path()).unwrap();
        let e = l.read_small(&v1).unwrap_err().to_string();
        assert!(e.contains("content has digest sha256:"), "{e}");
        let e = l.read_small(&v2).unwrap_err();
        assert!(matches!(e, LayoutError::MissingBlob { .. }), "{e}");
        let mut short = v1.clone();
        short.size = 2;
        let e = l.blob(&short).unwrap_err().to_string();
        assert!(e.contains("3 bytes, its descriptor says 2"), "{e}");

        std::fs::write(
            dir.path().join("oci-layout"),
            r#"{"imageLayoutVersion":"2.0.0"}"#,
        )
        .unwrap();
        let e = LayoutReader::open(dir.path()).unwrap_err().to_string();
        assert!(e.contains("version 2.0.0"), "{e}");
        std::fs::write(
            dir.path().join("oci-layout"),
            r#"{"imageLayoutVersion":"1.0.0"}"#,
        )
        .unwrap();
        std::fs::write(
            dir.path().join("index.json"),
            r#"{"schemaVersion":2,"manifests":[{"mediaType":"x","digest":"sha256:../../etc","size":1}]}"#,
        )
        .unwrap();
        let e = LayoutReader::open(dir.path()).unwrap_err().to_string();
        assert!(e.contains("unsupported digest"), "{e}");
    }

    fn tar_of(dir: &Path, prefix: &str, gzip: bool) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        b.append_dir_all(prefix, dir).unwrap();
        let tar = b.into_inner().unwrap();
        if !gzip {
            return tar;
        }
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).unwrap();
        gz.finish().unwrap()
    }

    #[test]
    fn reads_tar_and_gzip_archives_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let layout = dir.path().join("layout");
        let (v1, v2) = sample(&layout);
        for (prefix, gzip) in [(".", false), ("", false), ("img", true), ("a/b", false)] {
            let archive = dir.path().join("x.tar");
            std::fs::write(&archive, tar_of(&layout, prefix, gzip)).unwrap();
            let l = LayoutReader::open(&archive).unwrap();
            assert_eq!(l.select(Some("v1")).unwrap(), v1, "{prefix:?} {gzip}");
            assert_eq!(l.read_small(&v2).unwrap(), b"two!");
            let r = l.blob(&v1).unwrap();
            assert_eq!(r.len, 3);
            assert!(gzip || r.offset > 0, "read in place");
        }
        // Nothing of the decompressed copy is left in the temp dir.
        let leftovers = std::fs::read_dir(std::env::temp_dir())
            .unwrap()
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!("hive-archive-{}-", std::process::id()))
            })
            .count();
        assert_eq!(leftovers, 0);

        let junk = dir.path().join("junk.tar");
        std::fs::write(&junk, vec![7u8; 2048]).unwrap();
        let e = LayoutReader::open(&junk).unwrap_err().to_string();
        assert!(e.contains("not an OCI image layout"), "{e}");
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(2);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "index.json", &b"{}"[..]).unwrap();
        std::fs::write(&junk, b.into_inner().unwrap()).unwrap();
        let e = LayoutReader::open(&junk).unwrap_err().to_string();
        assert!(e.contains("no oci-layout file"), "{e}");
    }

    /// Archives are fed by users: truncated or damaged ones fail (or read), never panic,
    /// and a blob read through one is still checked against its digest.
    #[test]
    fn damaged_archives_fail_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let layout = dir.path().join("layout");
        let (v1, _) = sample(&layout);
        let tar = tar_of(&layout, "", false);
        let archive = dir.path().join("x.tar");
        let mut seed = 0x2545_f491_u32;
        for i in 0..200 {
            let mut bytes = tar.clone();
            // xorshift: no rand dependency for a test.
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            if i % 2 == 0 {
                bytes.truncate(seed as usize % tar.len());
            } else {
                let at = seed as usize % bytes.len();
                bytes[at] ^= 1 << (seed % 8);
            }
            std::fs::write(&archive, &bytes).unwrap();
            if let Ok(l) = LayoutReader::open(&archive)
                && let Ok(d) = l.select(Some("v1"))
                && let Ok(content) = l.read_small(&d)
            {
                assert_eq!(d.digest, v1.digest);
                assert_eq!(content, b"one");
            }
        }
    }

    #[test]
    fn splits_a_source_into_path_and_name() {
        let dir = tempfile::tempdir().unwrap();
        let with_colon = dir.path().join("a:b");
        std::fs::create_dir(&with_colon).unwrap();
        let s = with_colon.to_str().unwrap();
        assert_eq!(split_source(s), (with_colon.clone(), None));
        assert_eq!(
            split_source(&format!("{s}:v1")),
            (with_colon.clone(), Some("v1".into()))
        );
        assert_eq!(split_source("/no/such"), (PathBuf::from("/no/such"), None));
        assert_eq!(
            split_source("/no/such:x/y"),
            (PathBuf::from("/no/such:x/y"), None)
        );
    }

    #[test]
    fn writer_publishes_blobs_whole_and_names_images_once() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("out");
        let w = LayoutWriter::create(&root).unwrap();
        let digest = sha256_of(b"hello");
        assert!(w.write_blob(&sha256_of(b"other"), b"hello").is_err());
        let d = Descriptor::new(MANIFEST, &digest, 5);
        assert!(!w.has_blob(&d));
        w.write_blob(&digest, b"hello").unwrap();
        assert!(w.has_blob(&d));
        let mut named = d.clone();
        named.annotations.insert(REF_NAME.into(), "v1".into());
        w.add_image(named.clone()).unwrap();
        w.add_image(d.clone()).unwrap();
        // The same name again replaces; the unnamed one again is not listed twice.
        let other = Descriptor::new(MANIFEST, &sha256_of(b"x"), 1);
        let mut renamed = other.clone();
        renamed.annotations.insert(REF_NAME.into(), "v1".into());
        w.add_image(renamed.clone()).unwrap();
        w.add_image(d.clone()).unwrap();
        drop(w);
        let names: Vec<_> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(
            !names.iter().any(|n| n.starts_with(".hive-tmp")),
            "{names:?}"
        );
        // What the writer made reads back as a layout (for the blobs it has).
        let l = LayoutReader::open(&root).unwrap();
        assert_eq!(l.images(), &[renamed, d.clone()]);
        assert_eq!(l.read_small(&d).unwrap(), b"hello");
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(root.join("index.json")).unwrap()).unwrap();
        assert_eq!(
            index["mediaType"],
            "application/vnd.oci.image.index.v1+json"
        );

        std::fs::write(root.join("index.json"), "not json").unwrap();
        let e = LayoutWriter::create(&root).unwrap_err().to_string();
        assert!(e.contains("bad index.json"), "{e}");
        let file = dir.path().join("file");
        std::fs::write(&file, "").unwrap();
        assert!(LayoutWriter::create(&file).is_err());
    }
}
