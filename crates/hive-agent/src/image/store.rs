//! The node's image store: pulls images, keeps each layer unpacked once in a content-addressed
//! directory, records which images exist and which instances use them, composes and removes
//! instance root filesystems, and garbage-collects under a disk budget.
//!
//! Layout under the store root (see `docs/images.md`):
//!
//! ```text
//! tmp/                          partial downloads and unpacks (wiped when the store opens)
//! blobs/sha256/<hex>            manifests and configs, verified
//! layers/<hex>/fs/              one unpacked layer (an overlayfs lowerdir), keyed by the
//!                               layer blob's digest; appears atomically (rename from tmp/)
//! layers/<hex>/layer.json       diff-id, media type, unpacked size
//! images/<sha256(ref)>.json     reference -> manifest digest, config digest, layer list
//! points/<key>/                 the runtime's mount points an image lacks: a layer of its
//!                               own on top of the image's, keyed by its layers and the points
//! instances/<id>/               upper/, work/, rootfs/ (mountpoint), image.json
//! spares/<n>/                   the same, composed ahead for an image started lately; renamed
//!                               to instances/<id>/ by the next compose of that image
//! ```
//!
//! It must not know about runtimes or the API: instances are opaque ids here.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use futures_util::{StreamExt, TryStreamExt};
use oci_spec::image::{ImageConfiguration, ImageIndex, ImageManifest};
use serde::{Deserialize, Serialize};

use super::layout::valid_digest;
use super::mountpoints::{self, MountPoint};
use super::overlay::{KernelMounter, Mounter, OverlayError};
use super::reference::{Reference, ReferenceError};
use super::registry::{BlobChunk, Credentials, RegistryClient, RegistryError, sha256_of};
use super::unpack::{self, Compression, Limits, UnpackError};

/// Which images this node can run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Platform {
    /// The platform this binary runs on, in OCI (GOARCH) names.
    pub fn host() -> Self {
        let (architecture, variant) = match std::env::consts::ARCH {
            "x86_64" => ("amd64", None),
            "aarch64" => ("arm64", Some("v8")),
            "x86" => ("386", None),
            "arm" => ("arm", Some("v7")),
            "powerpc64" => ("ppc64le", None),
            other => (other, None),
        };
        Platform {
            os: "linux".into(),
            architecture: architecture.into(),
            variant: variant.map(str::to_owned),
        }
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// How the store is set up.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub root: PathBuf,
    /// Registry hosts (`host:port`) reached over plain HTTP.
    pub insecure_registries: Vec<String>,
    /// Credentials by registry host.
    pub credentials: HashMap<String, Credentials>,
    pub limits: Limits,
    pub platform: Platform,
    /// Layers downloaded at once per pull.
    pub concurrency: usize,
    /// What the runtime mounts over in every container, made once per image in a layer on
    /// top of the image's (see [`mountpoints`]).
    pub mount_points: Vec<MountPoint>,
}

impl StoreConfig {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        StoreConfig {
            root: root.into(),
            insecure_registries: Vec::new(),
            credentials: HashMap::new(),
            limits: Limits::default(),
            platform: Platform::host(),
            concurrency: 4,
            mount_points: Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    #[error("pull {reference}: {source}")]
    Registry {
        reference: String,
        #[source]
        source: RegistryError,
    },
    #[error("pull layer {digest} of {reference}: {source}")]
    Layer {
        reference: String,
        digest: String,
        #[source]
        source: RegistryError,
    },
    #[error("unpack layer {digest} of {reference}: {source}")]
    Unpack {
        reference: String,
        digest: String,
        #[source]
        source: UnpackError,
    },
    #[error(
        "unpack layer {digest} of {reference}: diff-id mismatch (config says {expected}, got {actual})"
    )]
    DiffIdMismatch {
        reference: String,
        digest: String,
        expected: String,
        actual: String,
    },
    #[error("pull {reference}: no image for platform {platform} (available: {available})")]
    UnknownArchitecture {
        reference: String,
        platform: String,
        available: String,
    },
    #[error("pull {reference}: unsupported media type {media_type:?}")]
    UnsupportedMediaType {
        reference: String,
        media_type: String,
    },
    #[error("pull {reference}: bad {what}: {message}")]
    BadDocument {
        reference: String,
        what: &'static str,
        message: String,
    },
    #[error("image {0} is not in the store")]
    NotPresent(String),
    #[error("image {0} is in use by instances {1:?}")]
    InUse(String, Vec<String>),
    #[error("invalid instance id {0:?}")]
    BadInstanceId(String),
    #[error("instance {0} already has a root filesystem")]
    InstanceExists(String),
    #[error("rootfs of instance {instance}: {source}")]
    Overlay {
        instance: String,
        #[source]
        source: OverlayError,
    },
    #[error("disk full writing {path}")]
    DiskFull { path: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("store task failed: {0}")]
    Task(String),
}

type Result<T, E = ImageError> = std::result::Result<T, E>;

/// The parts of an image's config that starting a container needs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    pub env: Vec<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    pub exposed_ports: Vec<String>,
    pub stop_signal: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("image {0} has neither entrypoint nor cmd")]
pub struct NoCommand(pub String);

impl ImageConfig {
    fn from_oci(c: &ImageConfiguration) -> Self {
        let Some(cfg) = c.config() else {
            return ImageConfig::default();
        };
        ImageConfig {
            env: cfg.env().clone().unwrap_or_default(),
            entrypoint: cfg.entrypoint().clone().unwrap_or_default(),
            cmd: cfg.cmd().clone().unwrap_or_default(),
            working_dir: cfg.working_dir().clone().filter(|s| !s.is_empty()),
            user: cfg.user().clone().filter(|s| !s.is_empty()),
            exposed_ports: cfg.exposed_ports().clone().unwrap_or_default(),
            stop_signal: cfg.stop_signal().clone().filter(|s| !s.is_empty()),
        }
    }

    /// The process to run by default: entrypoint followed by cmd. An image with neither is an
    /// error the caller decides about (a service may bring its own command).
    pub fn command(&self, reference: &str) -> Result<Vec<String>, NoCommand> {
        let argv: Vec<String> = self.entrypoint.iter().chain(&self.cmd).cloned().collect();
        if argv.is_empty() {
            Err(NoCommand(reference.to_owned()))
        } else {
            Ok(argv)
        }
    }
}

/// One layer of a pulled image, bottom first in [`Image::layers`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRef {
    /// Digest of the layer blob as in the manifest; the store key.
    pub digest: String,
    pub diff_id: String,
}

/// A pulled image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    pub reference: String,
    pub manifest_digest: String,
    pub config_digest: String,
    pub layers: Vec<LayerRef>,
    pub config: ImageConfig,
    /// Milliseconds since the epoch, set at pull and at compose (at most once a minute);
    /// what GC evicts by.
    pub last_used: u64,
}

/// How old an image's `last_used` must be for a compose to set it again.
const LAST_USED_EVERY_MS: u64 = 60_000;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct LayerMeta {
    digest: String,
    diff_id: String,
    media_type: String,
    bytes: u64,
    entries: u64,
}

/// `image.json` of an instance (or a spare: no instance).
#[derive(Debug, Serialize, Deserialize)]
struct InstanceRecord {
    instance: String,
    image: String,
    /// The layers its root filesystem mounts, bottom first: the image's when it was
    /// composed. A later pull of a tag that moved rewrites the image's record, not
    /// this: GC keeps these layers while the instance exists, and a remount mounts these.
    /// Empty in records of agents before session 21 (then: the image's current layers).
    #[serde(default)]
    layers: Vec<LayerRef>,
}

/// A composed root filesystem.
#[derive(Debug, Clone)]
pub struct Rootfs {
    pub instance: String,
    /// The mounted overlay: the container's `/`.
    pub path: PathBuf,
}

/// What a GC pass removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GcReport {
    pub images_removed: Vec<String>,
    pub layers_removed: Vec<String>,
    pub bytes_before: u64,
    pub bytes_after: u64,
}

#[derive(Debug)]
pub struct ImageStore {
    cfg: StoreConfig,
    client: RegistryClient,
    /// One lock per layer digest: a second pull of the same layer waits for the first.
    layer_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Pulls and rootfs composition share it; GC takes it alone so it never removes a layer
    /// that a pull or a compose is about to use.
    gc_lock: tokio::sync::RwLock<()>,
    mounter: Arc<dyn Mounter>,
    spares: Mutex<Spares>,
    /// A refill of the spares is under way.
    filling: std::sync::atomic::AtomicBool,
}

/// Root filesystems composed ahead ([`ImageStore::refill_spares`]) for the images composed
/// last: the next compose of one of them renames a spare into place instead of making its
/// directories and mounting its overlay within the start.
#[derive(Debug, Default)]
struct Spares {
    ready: Vec<SpareRootfs>,
    /// The images composed last, the latest last (at most [`SPARE_IMAGES`]).
    recent: Vec<Image>,
    /// The number of the next spare's directory.
    next: u64,
}

#[derive(Debug)]
struct SpareRootfs {
    dir: PathBuf,
    /// The layers it mounts (topmost first): a compose takes one with the same.
    lower: Vec<PathBuf>,
    reference: String,
}

/// How many images have spares at once, and how many each.
const SPARE_IMAGES: usize = 4;
const SPARES_PER_IMAGE: usize = 2;

static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

fn hex_of(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Renames `from` to `to`, failing with `EEXIST` rather than replace anything there.
fn rename_noreplace(from: &Path, to: &Path) -> nix::Result<()> {
    use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};
    renameat2(AT_FDCWD, from, AT_FDCWD, to, RenameFlags::RENAME_NOREPLACE)
}

fn io_err(path: &Path, e: std::io::Error) -> ImageError {
    if e.raw_os_error() == Some(rustix::io::Errno::NOSPC.raw_os_error()) {
        ImageError::DiskFull {
            path: path.display().to_string(),
        }
    } else {
        ImageError::Io {
            path: path.display().to_string(),
            source: e,
        }
    }
}

fn compression_of(media_type: &str) -> Option<Compression> {
    match media_type {
        "application/vnd.oci.image.layer.v1.tar"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar"
        | "application/vnd.docker.image.rootfs.diff.tar" => Some(Compression::None),
        "application/vnd.oci.image.layer.v1.tar+gzip"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
        | "application/vnd.docker.image.rootfs.diff.tar.gzip"
        | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Some(Compression::Gzip),
        "application/vnd.oci.image.layer.v1.tar+zstd"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => Some(Compression::Zstd),
        _ => None,
    }
}

pub(crate) const INDEX_TYPES: [&str; 2] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];
pub(crate) const MANIFEST_TYPES: [&str; 2] = [
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

impl ImageStore {
    /// Opens (creating if needed) the store at `cfg.root`, clearing leftovers of interrupted
    /// pulls.
    pub fn open(cfg: StoreConfig) -> Result<Self> {
        Self::open_with_mounter(cfg, Arc::new(KernelMounter))
    }

    /// Like [`ImageStore::open`], with another [`Mounter`] (a fake in tests).
    pub fn open_with_mounter(cfg: StoreConfig, mounter: Arc<dyn Mounter>) -> Result<Self> {
        for d in [
            "blobs/sha256",
            "layers",
            "images",
            "points",
            "instances",
            "spares",
        ] {
            let p = cfg.root.join(d);
            std::fs::create_dir_all(&p).map_err(|e| io_err(&p, e))?;
        }
        let tmp = cfg.root.join("tmp");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| io_err(&tmp, e))?;
        }
        std::fs::create_dir_all(&tmp).map_err(|e| io_err(&tmp, e))?;
        let client = RegistryClient::new(cfg.insecure_registries.clone(), cfg.credentials.clone())
            .map_err(|source| ImageError::Registry {
                reference: "-".into(),
                source,
            })?;
        let store = ImageStore {
            cfg,
            client,
            layer_locks: Mutex::new(HashMap::new()),
            gc_lock: tokio::sync::RwLock::new(()),
            mounter,
            spares: Mutex::new(Spares::default()),
            filling: Default::default(),
        };
        // Spares are known only to the process that made them: an earlier one's go. One
        // that cannot (its mount busy) stays, and is no reason not to open the store.
        let dir = store.cfg.root.join("spares");
        for e in std::fs::read_dir(&dir).map_err(|e| io_err(&dir, e))? {
            let e = e.map_err(|e| io_err(&dir, e))?;
            if let Err(err) = store.release_spare_dir(&e.path()) {
                tracing::warn!(error = %err, "remove an earlier process's spare root filesystem");
            }
        }
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.cfg.root
    }

    fn tmp_path(&self, what: &str) -> PathBuf {
        // Process-wide counter plus pid: unique across stores sharing one root, in this
        // process or another.
        let n = TMP_SEQ.fetch_add(1, Ordering::Relaxed);
        self.cfg
            .root
            .join("tmp")
            .join(format!("{what}-{}-{n}", std::process::id()))
    }

    fn image_record_path(&self, reference: &str) -> PathBuf {
        let key = hex_of(&sha256_of(reference.as_bytes())).to_owned();
        self.cfg.root.join("images").join(format!("{key}.json"))
    }

    /// The directory holding the unpacked layer `digest` (an overlayfs lowerdir).
    pub fn layer_dir(&self, digest: &str) -> PathBuf {
        self.cfg.root.join("layers").join(hex_of(digest)).join("fs")
    }

    /// The image stored under `reference` (as written at pull time, normalised), if any.
    pub fn get(&self, reference: &str) -> Result<Option<Image>> {
        let r = Reference::parse(reference)?;
        self.read_image(&self.image_record_path(&r.to_string()))
    }

    fn read_image(&self, path: &Path) -> Result<Option<Image>> {
        match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| ImageError::Io {
                    path: path.display().to_string(),
                    source: std::io::Error::other(e),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(path, e)),
        }
    }

    /// Every image in the store.
    pub fn list(&self) -> Result<Vec<Image>> {
        let dir = self.cfg.root.join("images");
        let mut out = Vec::new();
        for e in std::fs::read_dir(&dir).map_err(|e| io_err(&dir, e))? {
            let e = e.map_err(|e| io_err(&dir, e))?;
            if e.path().extension().is_some_and(|x| x == "json")
                && let Some(img) = self.read_image(&e.path())?
            {
                out.push(img);
            }
        }
        Ok(out)
    }

    /// Pulls `reference` (tag or digest): resolves the node's platform in an index, fetches
    /// and verifies the config and every layer (concurrently), and unpacks layers not yet in
    /// the store. Returns the image with its parsed config.
    pub async fn pull(&self, reference: &str) -> Result<Image> {
        let r = Reference::parse(reference)?;
        let name = r.to_string();
        let _shared = self.gc_lock.read().await;
        let reg_err = |source| ImageError::Registry {
            reference: name.clone(),
            source,
        };
        let bad = |what, message: String| ImageError::BadDocument {
            reference: name.clone(),
            what,
            message,
        };

        let mut fetched = self
            .client
            .manifest(&r, r.manifest_ref())
            .await
            .map_err(reg_err)?;
        let mut media_type = doc_media_type(&fetched.bytes, fetched.content_type.as_deref());
        if INDEX_TYPES.contains(&media_type.as_str()) {
            let index: ImageIndex =
                serde_json::from_slice(&fetched.bytes).map_err(|e| bad("index", e.to_string()))?;
            let chosen = self.choose_platform(&name, &index)?;
            fetched = self.client.manifest(&r, &chosen).await.map_err(reg_err)?;
            media_type = doc_media_type(&fetched.bytes, fetched.content_type.as_deref());
        }
        if !MANIFEST_TYPES.contains(&media_type.as_str()) {
            return Err(ImageError::UnsupportedMediaType {
                reference: name,
                media_type,
            });
        }
        let manifest: ImageManifest =
            serde_json::from_slice(&fetched.bytes).map_err(|e| bad("manifest", e.to_string()))?;
        self.save_blob(&fetched.digest, &fetched.bytes)?;

        // Digests become file names below: refuse anything but sha256 and 64 hex digits
        // before any of them is used.
        for d in std::iter::once(manifest.config().digest())
            .chain(manifest.layers().iter().map(|l| l.digest()))
        {
            if !valid_digest(d.as_ref()) {
                return Err(bad(
                    "manifest",
                    format!("unsupported digest {:?}", d.to_string()),
                ));
            }
        }
        let config_digest = manifest.config().digest().to_string();
        let config_bytes = self
            .client
            .small_blob(&r, &config_digest)
            .await
            .map_err(reg_err)?;
        let config: ImageConfiguration =
            serde_json::from_slice(&config_bytes).map_err(|e| bad("config", e.to_string()))?;
        let arch = config.architecture().to_string();
        let os = config.os().to_string();
        if arch != self.cfg.platform.architecture || os != self.cfg.platform.os {
            return Err(ImageError::UnknownArchitecture {
                reference: name,
                platform: self.cfg.platform.to_string(),
                available: format!("{os}/{arch}"),
            });
        }
        let diff_ids = config.rootfs().diff_ids();
        if diff_ids.len() != manifest.layers().len() {
            return Err(bad(
                "config",
                format!(
                    "{} diff-ids for {} layers",
                    diff_ids.len(),
                    manifest.layers().len()
                ),
            ));
        }
        self.save_blob(&config_digest, &config_bytes)?;

        // Owned, so that the fetches' futures borrow nothing of the manifest (the pull then
        // runs on any thread).
        let wanted: Vec<(String, String, u64, String)> = manifest
            .layers()
            .iter()
            .zip(diff_ids)
            .map(|(desc, diff_id)| {
                let (digest, media_type) =
                    (desc.digest().to_string(), desc.media_type().to_string());
                (digest, media_type, desc.size(), diff_id.clone())
            })
            .collect();
        let layers: Vec<LayerRef> = futures_util::stream::iter(wanted.into_iter().map(
            |(digest, media_type, size, diff_id)| {
                let name = name.clone();
                let r = r.clone();
                async move {
                    self.ensure_layer(&r, &name, &digest, &media_type, size, &diff_id)
                        .await?;
                    Ok::<_, ImageError>(LayerRef { digest, diff_id })
                }
            },
        ))
        .buffered(self.cfg.concurrency.max(1))
        .try_collect()
        .await?;

        let image = Image {
            reference: name.clone(),
            manifest_digest: fetched.digest,
            config_digest,
            layers,
            config: ImageConfig::from_oci(&config),
            last_used: now(),
        };
        self.write_image(&image)?;
        tracing::info!(
            reference = %image.reference,
            manifest = %image.manifest_digest,
            layers = image.layers.len(),
            "image pulled"
        );
        Ok(image)
    }

    fn write_image(&self, image: &Image) -> Result<()> {
        let path = self.image_record_path(&image.reference);
        let json = serde_json::to_vec_pretty(image).map_err(|e| ImageError::Io {
            path: path.display().to_string(),
            source: std::io::Error::other(e),
        })?;
        self.write_atomic(&path, &json)
    }

    fn write_atomic(&self, path: &Path, bytes: &[u8]) -> Result<()> {
        let tmp = self.tmp_path("write");
        std::fs::write(&tmp, bytes).map_err(|e| io_err(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| io_err(path, e))
    }

    fn save_blob(&self, digest: &str, bytes: &[u8]) -> Result<()> {
        let path = self.cfg.root.join("blobs/sha256").join(hex_of(digest));
        if path.exists() {
            return Ok(());
        }
        self.write_atomic(&path, bytes)
    }

    fn choose_platform(&self, name: &str, index: &ImageIndex) -> Result<String> {
        let want = &self.cfg.platform;
        let mut available = Vec::new();
        let mut fallback = None;
        for m in index.manifests() {
            let Some(p) = m.platform() else { continue };
            let (os, arch) = (p.os().to_string(), p.architecture().to_string());
            available.push(match p.variant() {
                Some(v) => format!("{os}/{arch}/{v}"),
                None => format!("{os}/{arch}"),
            });
            if os != want.os || arch != want.architecture {
                continue;
            }
            // An exact variant match wins; otherwise the first entry of the architecture.
            if p.variant().as_deref() == want.variant.as_deref() {
                return Ok(m.digest().to_string());
            }
            fallback.get_or_insert_with(|| m.digest().to_string());
        }
        fallback.ok_or_else(|| ImageError::UnknownArchitecture {
            reference: name.to_owned(),
            platform: want.to_string(),
            available: if available.is_empty() {
                "none".into()
            } else {
                available.join(", ")
            },
        })
    }

    /// Makes sure layer `digest` is unpacked in the store. Concurrent callers for the same
    /// digest in this process wait for one another; another process racing on the same layer
    /// loses the final rename and discards its copy, so a layer dir is written exactly once.
    async fn ensure_layer(
        &self,
        r: &Reference,
        name: &str,
        digest: &str,
        media_type: &str,
        size: u64,
        diff_id: &str,
    ) -> Result<()> {
        let lock = {
            let mut locks = self
                .layer_locks
                .lock()
                .map_err(|_| ImageError::Task("layer lock poisoned".into()))?;
            locks.entry(digest.to_owned()).or_default().clone()
        };
        let result = {
            let _guard = lock.lock().await;
            self.ensure_layer_locked(r, name, digest, media_type, size, diff_id)
                .await
        };
        // Forget the lock once nobody else holds or waits for it, so the map stays small.
        if let Ok(mut locks) = self.layer_locks.lock()
            && Arc::strong_count(&lock) == 2
        {
            locks.remove(digest);
        }
        result
    }

    async fn ensure_layer_locked(
        &self,
        r: &Reference,
        name: &str,
        digest: &str,
        media_type: &str,
        size: u64,
        diff_id: &str,
    ) -> Result<()> {
        let final_dir = self.cfg.root.join("layers").join(hex_of(digest));
        if final_dir.join("layer.json").exists() {
            return Ok(());
        }
        if final_dir.exists() {
            // A layer dir without its metadata is what a GC interrupted midway leaves (layers
            // are published with the metadata inside): it is garbage, not a layer.
            std::fs::remove_dir_all(&final_dir).map_err(|e| io_err(&final_dir, e))?;
        }
        let compression =
            compression_of(media_type).ok_or_else(|| ImageError::UnsupportedMediaType {
                reference: name.to_owned(),
                media_type: media_type.to_owned(),
            })?;
        // The unpacker reads the blob as it arrives: download, decompression and extraction
        // overlap. It publishes nothing unless the download ends verified.
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let job = PublishLayer {
            source: ChunkReader::new(rx),
            staging: self.tmp_path("layer"),
            final_dir,
            compression,
            limits: self.cfg.limits,
            reference: name.to_owned(),
            digest: digest.to_owned(),
            diff_id: diff_id.to_owned(),
            media_type: media_type.to_owned(),
        };
        // The blocking task owns the staging dir and finishes (or cleans up) even if this
        // pull is cancelled: nothing is left behind in tmp/.
        let unpack = tokio::task::spawn_blocking(move || job.run());
        let downloaded = self.client.blob_stream(r, digest, size, &tx).await;
        drop(tx);
        let published = unpack.await.map_err(|e| ImageError::Task(e.to_string()))?;
        // The download's own error explains an unpack that saw the stream fail.
        downloaded.map_err(|source| ImageError::Layer {
            reference: name.to_owned(),
            digest: digest.to_owned(),
            source,
        })?;
        published
    }

    /// Composes the root filesystem of `instance` from `image`: an overlay mount of the
    /// image's layer dirs (read-only, shared) and its mount points' layer (see
    /// [`StoreConfig::mount_points`]) under a private upper/work dir; a spare composed ahead
    /// for the same layers is renamed into place instead ([`ImageStore::refill_spares`]).
    /// The instance counts as a user of the image until [`ImageStore::release_rootfs`].
    pub async fn compose_rootfs(&self, image: &Image, instance: &str) -> Result<Rootfs> {
        check_instance_id(instance)?;
        let _shared = self.gc_lock.read().await;
        let dir = self.cfg.root.join("instances").join(instance);
        let lower = self.lower_dirs(image)?;
        let spare = self.take_spare(image, &lower);
        let adopted = match spare {
            Some(spare) => self.adopt(spare, image, instance, &dir)?,
            None => None,
        };
        let rootfs = match adopted {
            Some(r) => r,
            None => self.compose_new(image, instance, &dir, &lower)?,
        };
        // The image's record is rewritten (a new file on the data dir's file system) only
        // once its last use is a minute old: GC needs the order of uses, not every one.
        let at = now();
        if at.saturating_sub(image.last_used) >= LAST_USED_EVERY_MS
            && let Some(mut img) = self.read_image(&self.image_record_path(&image.reference))?
            && at.saturating_sub(img.last_used) >= LAST_USED_EVERY_MS
        {
            img.last_used = at;
            self.write_image(&img)?;
        }
        Ok(rootfs)
    }

    fn compose_new(
        &self,
        image: &Image,
        instance: &str,
        dir: &Path,
        lower: &[PathBuf],
    ) -> Result<Rootfs> {
        match std::fs::create_dir(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(ImageError::InstanceExists(instance.to_owned()));
            }
            Err(e) => return Err(io_err(dir, e)),
        }
        let result = self.fill(image, instance, dir, lower);
        if result.is_err() {
            let _ = self.remove_composed(dir, instance);
        }
        result.map(|path| Rootfs {
            instance: instance.to_owned(),
            path,
        })
    }

    /// Fills the new directory `dir` with a root filesystem of `image` over `lower` (its
    /// [`ImageStore::lower_dirs`]; for `instance`: empty for a spare) and returns its mounted
    /// `rootfs/`.
    fn fill(
        &self,
        image: &Image,
        instance: &str,
        dir: &Path,
        lower: &[PathBuf],
    ) -> Result<PathBuf> {
        // The record goes first: from now on GC sees the image and its layers as used.
        self.write_instance_record(dir, instance, image)?;
        let (upper, work, rootfs) = (dir.join("upper"), dir.join("work"), dir.join("rootfs"));
        for d in [&upper, &work, &rootfs] {
            std::fs::create_dir(d).map_err(|e| io_err(d, e))?;
        }
        self.mounter
            .mount_overlay(lower, &upper, &work, &rootfs)
            .map_err(|source| ImageError::Overlay {
                instance: instance.to_owned(),
                source,
            })?;
        Ok(rootfs)
    }

    fn write_instance_record(&self, dir: &Path, instance: &str, image: &Image) -> Result<()> {
        let rec = InstanceRecord {
            instance: instance.to_owned(),
            image: image.reference.clone(),
            layers: image.layers.clone(),
        };
        let path = dir.join("image.json");
        let json = serde_json::to_vec(&rec).map_err(|e| ImageError::Io {
            path: path.display().to_string(),
            source: std::io::Error::other(e),
        })?;
        std::fs::write(&path, json).map_err(|e| io_err(&path, e))
    }

    fn spares(&self) -> std::sync::MutexGuard<'_, Spares> {
        self.spares.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A spare over `lower`, if one is ready; notes `image` as composed lately either way.
    fn take_spare(&self, image: &Image, lower: &[PathBuf]) -> Option<SpareRootfs> {
        let mut spares = self.spares();
        spares.recent.retain(|i| i.reference != image.reference);
        spares.recent.push(image.clone());
        if spares.recent.len() > SPARE_IMAGES {
            spares.recent.remove(0);
        }
        let i = spares.ready.iter().position(|s| s.lower == lower)?;
        Some(spares.ready.swap_remove(i))
    }

    /// Renames `spare` to `dir`, instance `instance`'s (never over an existing one). None:
    /// the spare could not be used (it is released), the rootfs is to be composed anew.
    fn adopt(
        &self,
        spare: SpareRootfs,
        image: &Image,
        instance: &str,
        dir: &Path,
    ) -> Result<Option<Rootfs>> {
        let moved = rename_noreplace(&spare.dir, dir);
        let unused = |why: String| {
            tracing::warn!(dir = %spare.dir.display(), error = %why, "a spare root filesystem");
            let _ = self.release_spare_dir(&spare.dir);
        };
        match moved {
            Ok(()) => {}
            Err(nix::errno::Errno::EEXIST) => {
                unused("the instance has one already".into());
                return Err(ImageError::InstanceExists(instance.to_owned()));
            }
            Err(e) => {
                unused(format!("rename to {}: {e}", dir.display()));
                return Ok(None);
            }
        }
        // Rewritten in place: no new file. Failing, the directory is the instance's (the
        // caller's cleanup releases it like any other).
        self.write_instance_record(dir, instance, image)?;
        Ok(Some(Rootfs {
            instance: instance.to_owned(),
            path: dir.join("rootfs"),
        }))
    }

    /// Composes spare root filesystems until each image composed lately has
    /// [`SPARES_PER_IMAGE`]; drops those of images no longer among them, and those over
    /// layers their image no longer has (its tag pulled again after it moved). Meant for when the
    /// node is quiet (the agent calls it once its starts are over); does nothing while
    /// another refill is under way. A failure is logged and ends the refill.
    pub async fn refill_spares(&self) {
        if self.filling.swap(true, Ordering::AcqRel) {
            return;
        }
        /// Lets the next refill run however this one ends.
        struct Done<'a>(&'a std::sync::atomic::AtomicBool);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Release);
            }
        }
        let _done = Done(&self.filling);
        let _shared = self.gc_lock.read().await;
        // The images composed lately, over their layers now: a spare of an image whose tag
        // moved since (pulled again: other layers) would never be taken.
        let recent: Vec<(Image, Vec<PathBuf>)> = self
            .spares()
            .recent
            .clone()
            .into_iter()
            .filter_map(|i| {
                let lower = self.lower_dirs(&i).ok()?;
                Some((i, lower))
            })
            .collect();
        let stale: Vec<SpareRootfs> = {
            let mut spares = self.spares();
            let (keep, stale) = std::mem::take(&mut spares.ready)
                .into_iter()
                .partition(|s| {
                    recent
                        .iter()
                        .any(|(i, lower)| i.reference == s.reference && *lower == s.lower)
                });
            spares.ready = keep;
            stale
        };
        for s in stale {
            let _ = self.release_spare_dir(&s.dir);
        }
        'images: for (image, lower) in recent.iter().rev() {
            loop {
                let n = {
                    let mut spares = self.spares();
                    if spares.ready.iter().filter(|s| s.lower == *lower).count() >= SPARES_PER_IMAGE
                    {
                        break;
                    }
                    spares.next += 1;
                    spares.next
                };
                let dir = self.cfg.root.join("spares").join(n.to_string());
                let made = std::fs::create_dir(&dir)
                    .map_err(|e| io_err(&dir, e))
                    .and_then(|()| self.fill(image, "", &dir, lower));
                match made {
                    Ok(_) => self.spares().ready.push(SpareRootfs {
                        dir,
                        lower: lower.clone(),
                        reference: image.reference.clone(),
                    }),
                    Err(e) => {
                        tracing::warn!(image = %image.reference, error = %e, "compose a spare root filesystem");
                        let _ = self.release_spare_dir(&dir);
                        break 'images;
                    }
                }
            }
        }
    }

    /// Drops the spares of image `reference` (its record is about to go).
    fn drop_spares_of(&self, reference: &str) {
        let gone: Vec<SpareRootfs> = {
            let mut spares = self.spares();
            spares.recent.retain(|i| i.reference != reference);
            let (gone, keep) = std::mem::take(&mut spares.ready)
                .into_iter()
                .partition(|s| s.reference == reference);
            spares.ready = keep;
            gone
        };
        for s in gone {
            if let Err(e) = self.release_spare_dir(&s.dir) {
                tracing::warn!(dir = %s.dir.display(), error = %e, "release a spare root filesystem");
            }
        }
    }

    /// Unmounts the root filesystem composed in `dir` (an instance's, or a spare's) and
    /// removes `dir`; never through a mount that is still there (that would empty the
    /// layers). `who` names it in the error.
    fn remove_composed(&self, dir: &Path, who: &str) -> Result<()> {
        self.mounter
            .unmount(&dir.join("rootfs"))
            .map_err(|source| ImageError::Overlay {
                instance: who.to_owned(),
                source,
            })?;
        match std::fs::remove_dir_all(dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(dir, e)),
        }
    }

    /// [`ImageStore::remove_composed`] of a spare's directory.
    fn release_spare_dir(&self, dir: &Path) -> Result<()> {
        self.remove_composed(dir, &dir.display().to_string())
    }

    /// Mounts the root filesystem of an existing instance again if it is not mounted (after
    /// a reboot, mounts are gone but `instances/<id>/` with its upper dir survives). Returns
    /// the rootfs; a no-op when it is still mounted.
    pub async fn remount_rootfs(&self, instance: &str) -> Result<Rootfs> {
        check_instance_id(instance)?;
        let _shared = self.gc_lock.read().await;
        let dir = self.cfg.root.join("instances").join(instance);
        let rec_path = dir.join("image.json");
        let bytes = std::fs::read(&rec_path).map_err(|e| io_err(&rec_path, e))?;
        let rec: InstanceRecord = serde_json::from_slice(&bytes).map_err(|e| ImageError::Io {
            path: rec_path.display().to_string(),
            source: std::io::Error::other(e),
        })?;
        let rootfs = dir.join("rootfs");
        if !self.mounter.is_mounted(&rootfs) {
            let mut image = self
                .read_image(&self.image_record_path(&rec.image))?
                .ok_or_else(|| ImageError::NotPresent(rec.image.clone()))?;
            // The layers it was composed over, if the record says (the tag may have moved).
            if !rec.layers.is_empty() {
                image.layers = rec.layers;
            }
            let lower = self.lower_dirs(&image)?;
            // The old work dir may hold state of the previous mount; overlayfs wants it empty.
            let work = dir.join("work");
            let _ = std::fs::remove_dir_all(&work);
            std::fs::create_dir(&work).map_err(|e| io_err(&work, e))?;
            self.mounter
                .mount_overlay(&lower, &dir.join("upper"), &work, &rootfs)
                .map_err(|source| ImageError::Overlay {
                    instance: instance.to_owned(),
                    source,
                })?;
        }
        Ok(Rootfs {
            instance: instance.to_owned(),
            path: rootfs,
        })
    }

    /// The lower dirs of a root filesystem of `image`, topmost first: its mount points'
    /// layer (made if missing), then its layers.
    fn lower_dirs(&self, image: &Image) -> Result<Vec<PathBuf>> {
        let mut lower = Vec::with_capacity(image.layers.len() + 1);
        // overlayfs lists the topmost layer first.
        for l in image.layers.iter().rev() {
            let d = self.layer_dir(&l.digest);
            if !d.is_dir() {
                return Err(ImageError::NotPresent(format!(
                    "{} (layer {})",
                    image.reference, l.digest
                )));
            }
            lower.push(d);
        }
        lower.insert(0, self.points_layer(image, &lower)?);
        Ok(lower)
    }

    /// Where the mount points' layer over `layers` (an image's, bottom first) is kept: keyed
    /// by the layers and the points, so another set of either gets its own.
    fn points_dir(&self, layers: &[LayerRef]) -> PathBuf {
        let mut key = String::new();
        for l in layers {
            key.push_str(&format!("layer {}\n", l.digest));
        }
        for p in &self.cfg.mount_points {
            let kind = if p.file { "file" } else { "dir" };
            key.push_str(&format!("{kind} {}\n", p.path.display()));
        }
        let hex = hex_of(&sha256_of(key.as_bytes())).to_owned();
        self.cfg.root.join("points").join(hex)
    }

    /// The layer holding the runtime's mount points that `image` lacks ([`mountpoints`]),
    /// over its layer dirs `layers` (topmost first): made once, in `tmp/` and renamed into
    /// place, so it is whole or absent; two composes making it at once keep the first.
    fn points_layer(&self, image: &Image, layers: &[PathBuf]) -> Result<PathBuf> {
        let dir = self.points_dir(&image.layers);
        if dir.is_dir() {
            return Ok(dir);
        }
        let tmp = self.tmp_path("points");
        let made = std::fs::create_dir(&tmp)
            .and_then(|()| mountpoints::make_layer(&tmp, layers, &self.cfg.mount_points))
            .map_err(|e| io_err(&tmp, e))
            .and_then(|()| match rename_noreplace(&tmp, &dir) {
                Ok(()) | Err(nix::errno::Errno::EEXIST) => Ok(()),
                Err(e) => Err(io_err(&dir, e.into())),
            });
        if tmp.exists() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        made.map(|()| dir)
    }

    /// Unmounts and removes the root filesystem of `instance` (its writable layer included).
    /// Best effort: every failure is returned, not only the first. Releasing an instance that
    /// has no rootfs is not an error.
    pub fn release_rootfs(&self, instance: &str) -> Vec<ImageError> {
        if let Err(e) = check_instance_id(instance) {
            return vec![e];
        }
        let dir = self.cfg.root.join("instances").join(instance);
        if !dir.exists() {
            return Vec::new();
        }
        self.remove_composed(&dir, instance)
            .err()
            .into_iter()
            .collect()
    }

    /// Every instance with a directory here, whether its rootfs was composed completely or
    /// not (a compose that crashed midway has no record, and may hold a mount).
    pub fn instance_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = std::fs::read_dir(self.cfg.root.join("instances"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|id| check_instance_id(id).is_ok())
            .collect();
        ids.sort();
        ids
    }

    /// Instances holding a rootfs, with the image each uses.
    pub fn instances(&self) -> Result<Vec<(String, String)>> {
        Ok(self
            .instance_records()?
            .into_iter()
            .map(|r| (r.instance, r.image))
            .collect())
    }

    fn instance_records(&self) -> Result<Vec<InstanceRecord>> {
        let dir = self.cfg.root.join("instances");
        let mut out = Vec::new();
        for e in std::fs::read_dir(&dir).map_err(|e| io_err(&dir, e))? {
            let e = e.map_err(|e| io_err(&dir, e))?;
            let rec_path = e.path().join("image.json");
            let Ok(bytes) = std::fs::read(&rec_path) else {
                // A dir without a record is a compose that crashed midway: it uses nothing.
                continue;
            };
            if let Ok(rec) = serde_json::from_slice::<InstanceRecord>(&bytes) {
                out.push(rec);
            }
        }
        Ok(out)
    }

    /// Removes an image record (its layers go at the next GC if nothing else uses them).
    pub async fn remove_image(&self, reference: &str) -> Result<()> {
        let r = Reference::parse(reference)?.to_string();
        let _excl = self.gc_lock.write().await;
        let users: Vec<String> = self
            .instances()?
            .into_iter()
            .filter(|(_, img)| *img == r)
            .map(|(i, _)| i)
            .collect();
        if !users.is_empty() {
            return Err(ImageError::InUse(r, users));
        }
        self.drop_spares_of(&r);
        let path = self.image_record_path(&r);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(ImageError::NotPresent(r)),
            Err(e) => Err(io_err(&path, e)),
        }
    }

    /// Garbage collection: while the unpacked layers exceed `budget_bytes`, removes the least
    /// recently used image that no instance uses; then removes every layer that no remaining
    /// image references. Images in use are never removed, even over budget.
    pub async fn gc(&self, budget_bytes: u64) -> Result<GcReport> {
        let _excl = self.gc_lock.write().await;
        let mut report = GcReport::default();
        let records = self.instance_records()?;
        let in_use: HashSet<String> = records.iter().map(|r| r.image.clone()).collect();
        let mut images = self.list()?;
        let layers = self.layer_sizes()?;
        let referenced_size = |images: &[Image]| -> u64 {
            let set: HashSet<&str> = images
                .iter()
                .flat_map(|i| i.layers.iter().map(|l| hex_of(&l.digest)))
                .collect();
            set.iter().filter_map(|h| layers.get(*h)).sum()
        };
        report.bytes_before = layers.values().sum();
        images.sort_by_key(|i| i.last_used);
        let mut kept = images.clone();
        for img in &images {
            if referenced_size(&kept) <= budget_bytes {
                break;
            }
            if in_use.contains(&img.reference) {
                continue;
            }
            // Its spares mount its layers.
            self.drop_spares_of(&img.reference);
            let path = self.image_record_path(&img.reference);
            std::fs::remove_file(&path).map_err(|e| io_err(&path, e))?;
            kept.retain(|k| k.reference != img.reference);
            report.images_removed.push(img.reference.clone());
        }
        // The kept images' layers, and those instances mount, which a tag pulled again since
        // may no longer name (records of earlier agents name none: their image's are kept).
        let stacks: Vec<&[LayerRef]> = kept
            .iter()
            .map(|i| i.layers.as_slice())
            .chain(
                records
                    .iter()
                    .filter(|r| !r.layers.is_empty())
                    .map(|r| r.layers.as_slice()),
            )
            .collect();
        let keep: HashSet<String> = stacks
            .iter()
            .flat_map(|s| s.iter().map(|l| hex_of(&l.digest).to_owned()))
            .collect();
        for hex in layers.keys() {
            if keep.contains(hex) {
                continue;
            }
            let dir = self.cfg.root.join("layers").join(hex);
            // The metadata goes first, so a crash midway leaves a dir that is recognisably
            // incomplete and is removed on the next pass instead of being used.
            let _ = std::fs::remove_file(dir.join("layer.json"));
            std::fs::remove_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
            report.layers_removed.push(format!("sha256:{hex}"));
        }
        // The mount points' layers of images no longer kept.
        let keep_points: HashSet<PathBuf> = stacks.iter().map(|s| self.points_dir(s)).collect();
        let points = self.cfg.root.join("points");
        for e in std::fs::read_dir(&points).map_err(|e| io_err(&points, e))? {
            let path = e.map_err(|e| io_err(&points, e))?.path();
            if !keep_points.contains(&path) {
                std::fs::remove_dir_all(&path).map_err(|e| io_err(&path, e))?;
            }
        }
        // Manifests and configs of images no longer kept.
        let keep_blobs: HashSet<&str> = kept
            .iter()
            .flat_map(|i| [hex_of(&i.manifest_digest), hex_of(&i.config_digest)])
            .collect();
        let blobs = self.cfg.root.join("blobs/sha256");
        for e in std::fs::read_dir(&blobs).map_err(|e| io_err(&blobs, e))? {
            let e = e.map_err(|e| io_err(&blobs, e))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if !keep_blobs.contains(name.as_str()) {
                std::fs::remove_file(e.path()).map_err(|err| io_err(&e.path(), err))?;
            }
        }
        report.bytes_after = layers
            .iter()
            .filter(|(h, _)| keep.contains(*h))
            .map(|(_, s)| s)
            .sum();
        tracing::info!(
            images = report.images_removed.len(),
            layers = report.layers_removed.len(),
            bytes_before = report.bytes_before,
            bytes_after = report.bytes_after,
            budget = budget_bytes,
            "image gc"
        );
        Ok(report)
    }

    /// Unpacked size of every layer in the store, by hex digest. A layer dir without its
    /// metadata (interrupted GC) counts as size 0 and unreferenced.
    fn layer_sizes(&self) -> Result<HashMap<String, u64>> {
        let dir = self.cfg.root.join("layers");
        let mut out = HashMap::new();
        for e in std::fs::read_dir(&dir).map_err(|e| io_err(&dir, e))? {
            let e = e.map_err(|e| io_err(&dir, e))?;
            let hex = e.file_name().to_string_lossy().into_owned();
            let size = std::fs::read(e.path().join("layer.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<LayerMeta>(&b).ok())
                .map(|m| m.bytes)
                .unwrap_or(0);
            out.insert(hex, size);
        }
        Ok(out)
    }
}

/// Removes a temporary file or directory when dropped, unless disarmed.
struct TmpGuard(Option<PathBuf>);

impl TmpGuard {
    fn disarm(mut self) -> PathBuf {
        self.0.take().unwrap_or_default()
    }
}

impl Drop for TmpGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(&p).or_else(|_| std::fs::remove_dir_all(&p));
        }
    }
}

/// Reads a blob from the chunks its download sends; end of file only after the download
/// said the blob verified.
struct ChunkReader {
    rx: tokio::sync::mpsc::Receiver<BlobChunk>,
    chunk: bytes::Bytes,
    verified: bool,
}

impl ChunkReader {
    fn new(rx: tokio::sync::mpsc::Receiver<BlobChunk>) -> Self {
        Self {
            rx,
            chunk: bytes::Bytes::new(),
            verified: false,
        }
    }

    /// Reads what is left (a tar may end before its blob does) until the verdict.
    fn finish(&mut self) -> std::io::Result<()> {
        let mut sink = [0u8; 64 << 10];
        while std::io::Read::read(self, &mut sink)? > 0 {}
        Ok(())
    }
}

impl std::io::Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.chunk.is_empty() {
            if self.verified {
                return Ok(0);
            }
            match self.rx.blocking_recv() {
                Some(BlobChunk::Data(b)) => self.chunk = b,
                Some(BlobChunk::Verified) => self.verified = true,
                Some(BlobChunk::Failed(e)) => return Err(std::io::Error::other(e)),
                None => {
                    return Err(std::io::Error::other(
                        "the download ended without a verdict",
                    ));
                }
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk.split_to(n));
        Ok(n)
    }
}

/// Unpacks a layer blob as it downloads into a staging dir, checks its diff-id, and
/// publishes it under `layers/` with one rename once the download verified. Runs on a
/// blocking thread; removes the staging dir unless it became the layer.
struct PublishLayer {
    source: ChunkReader,
    staging: PathBuf,
    final_dir: PathBuf,
    compression: Compression,
    limits: Limits,
    reference: String,
    digest: String,
    diff_id: String,
    media_type: String,
}

impl PublishLayer {
    fn run(mut self) -> Result<()> {
        let staging = TmpGuard(Some(self.staging.clone()));
        let unpack_err = |source| ImageError::Unpack {
            reference: self.reference.clone(),
            digest: self.digest.clone(),
            source,
        };
        std::fs::create_dir(&self.staging).map_err(|e| io_err(&self.staging, e))?;
        let unpacked = unpack::unpack_layer(
            &mut self.source,
            self.compression,
            &self.staging.join("fs"),
            self.limits,
        )
        .map_err(unpack_err)?;
        self.source
            .finish()
            .map_err(|e| unpack_err(unpack::UnpackError::Archive(e)))?;
        if unpacked.diff_id != self.diff_id {
            return Err(ImageError::DiffIdMismatch {
                reference: self.reference,
                digest: self.digest,
                expected: self.diff_id,
                actual: unpacked.diff_id,
            });
        }
        let meta = LayerMeta {
            digest: self.digest.clone(),
            diff_id: unpacked.diff_id,
            media_type: self.media_type.clone(),
            bytes: unpacked.bytes,
            entries: unpacked.entries,
        };
        let meta_path = self.staging.join("layer.json");
        let json = serde_json::to_vec_pretty(&meta).map_err(|e| ImageError::Io {
            path: meta_path.display().to_string(),
            source: std::io::Error::other(e),
        })?;
        std::fs::write(&meta_path, json).map_err(|e| io_err(&meta_path, e))?;
        match std::fs::rename(&self.staging, &self.final_dir) {
            Ok(()) => {
                staging.disarm();
                Ok(())
            }
            // Another process finished the same layer first (a non-empty target dir makes
            // rename fail): theirs is as good as ours, and ours is dropped with the guard.
            Err(_) if self.final_dir.join("layer.json").exists() => Ok(()),
            Err(e) => Err(io_err(&self.final_dir, e)),
        }
    }
}

/// Instance ids become directory names: keep them to a safe alphabet.
fn check_instance_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && !id.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(ImageError::BadInstanceId(id.to_owned()))
    }
}

/// A document's media type: its own `mediaType` field, else the `Content-Type` header, else
/// guessed from its shape (an index has `manifests`).
pub(crate) fn doc_media_type(bytes: &[u8], content_type: Option<&str>) -> String {
    #[derive(Deserialize)]
    struct Probe {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
        manifests: Option<serde_json::Value>,
        #[serde(rename = "schemaVersion")]
        schema_version: Option<u32>,
    }
    let probe: Option<Probe> = serde_json::from_slice(bytes).ok();
    if let Some(p) = &probe {
        if let Some(m) = &p.media_type {
            return m.clone();
        }
        if p.schema_version == Some(1) {
            return "application/vnd.docker.distribution.manifest.v1+json".into();
        }
    }
    if let Some(ct) = content_type
        && (INDEX_TYPES.contains(&ct) || MANIFEST_TYPES.contains(&ct))
    {
        return ct.to_owned();
    }
    match probe {
        Some(p) if p.manifests.is_some() => INDEX_TYPES[0].into(),
        Some(_) => MANIFEST_TYPES[0].into(),
        None => content_type.unwrap_or("unknown").to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_joins_entrypoint_and_cmd() {
        let mut c = ImageConfig::default();
        assert_eq!(c.command("x"), Err(NoCommand("x".into())));
        c.cmd = vec!["/bin/sh".into()];
        assert_eq!(c.command("x"), Ok(vec!["/bin/sh".to_owned()]));
        c.entrypoint = vec!["/init".into()];
        assert_eq!(
            c.command("x"),
            Ok(vec!["/init".to_owned(), "/bin/sh".to_owned()])
        );
    }

    #[test]
    fn media_types_are_detected() {
        assert_eq!(
            doc_media_type(br#"{"schemaVersion":2,"manifests":[]}"#, None),
            INDEX_TYPES[0]
        );
        assert_eq!(
            doc_media_type(
                br#"{"schemaVersion":2,"layers":[]}"#,
                Some(MANIFEST_TYPES[1])
            ),
            MANIFEST_TYPES[1]
        );
        assert_eq!(
            doc_media_type(br#"{"schemaVersion":1}"#, None),
            "application/vnd.docker.distribution.manifest.v1+json"
        );
        assert_eq!(
            compression_of("application/vnd.oci.image.layer.v1.tar+zstd"),
            Some(Compression::Zstd)
        );
        assert_eq!(compression_of("text/plain"), None);
    }

    #[test]
    fn digests_are_checked() {
        assert!(valid_digest(&format!("sha256:{}", "0".repeat(64))));
        for bad in ["sha256:../../etc", "sha512:00", "sha256:ABCD", ""] {
            assert!(!valid_digest(bad), "{bad:?}");
        }
    }

    fn fake_image(store: &ImageStore, n: usize) -> Image {
        let layers = (0..n)
            .map(|i| {
                let digest = format!("sha256:{:064x}", i + 1);
                std::fs::create_dir_all(store.layer_dir(&digest)).expect("layer dir");
                LayerRef {
                    digest: digest.clone(),
                    diff_id: digest,
                }
            })
            .collect();
        Image {
            reference: "reg.io/acme/fake:v1".into(),
            manifest_digest: format!("sha256:{:064x}", 100),
            config_digest: format!("sha256:{:064x}", 101),
            layers,
            config: ImageConfig::default(),
            last_used: 0,
        }
    }

    #[tokio::test]
    async fn compose_and_release_with_a_recording_mounter() {
        use super::super::overlay::{MountCall, RecordingMounter};
        let tmp = tempfile::tempdir().expect("tempdir");
        let fake = Arc::new(RecordingMounter::default());
        let store = ImageStore::open_with_mounter(StoreConfig::new(tmp.path()), fake.clone())
            .expect("open");
        let img = fake_image(&store, 3);
        let rootfs = store.compose_rootfs(&img, "web-1").await.expect("compose");
        let inst = tmp.path().join("instances/web-1");
        assert_eq!(rootfs.path, inst.join("rootfs"));
        assert_eq!(
            fake.calls(),
            [MountCall::Mount {
                // Topmost layer first, under the mount points' (none here: it is empty).
                lower: std::iter::once(store.points_dir(&img.layers))
                    .chain(img.layers.iter().rev().map(|l| store.layer_dir(&l.digest)))
                    .collect(),
                upper: inst.join("upper"),
                work: inst.join("work"),
                target: inst.join("rootfs"),
            }]
        );
        assert_eq!(
            std::fs::read_dir(store.points_dir(&img.layers))
                .unwrap()
                .count(),
            0
        );
        assert_eq!(
            store.instances().expect("instances"),
            [("web-1".to_owned(), img.reference.clone())]
        );
        // Remount is a no-op while mounted.
        store.remount_rootfs("web-1").await.expect("remount");
        assert_eq!(fake.calls().len(), 1);

        assert!(store.release_rootfs("web-1").is_empty());
        assert_eq!(
            fake.calls()[1],
            MountCall::Unmount {
                target: inst.join("rootfs")
            }
        );
        assert!(!inst.exists());
        assert!(
            store.release_rootfs("web-1").is_empty(),
            "releasing twice is fine"
        );

        // A failed mount leaves no instance dir behind.
        fake.fail_mount
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let err = store
            .compose_rootfs(&img, "web-2")
            .await
            .expect_err("mount fails");
        assert!(matches!(err, ImageError::Overlay { .. }), "{err}");
        assert!(!tmp.path().join("instances/web-2").exists());

        // A missing layer is reported before any mount.
        fake.fail_mount
            .store(false, std::sync::atomic::Ordering::SeqCst);
        let mut broken = img.clone();
        broken.layers.push(LayerRef {
            digest: format!("sha256:{:064x}", 99),
            diff_id: String::new(),
        });
        let calls = fake.calls().len();
        let err = store
            .compose_rootfs(&broken, "web-3")
            .await
            .expect_err("missing layer");
        assert!(matches!(err, ImageError::NotPresent(_)), "{err}");
        assert_eq!(fake.calls().len(), calls, "nothing mounted");
        assert!(!tmp.path().join("instances/web-3").exists());
    }

    #[tokio::test]
    async fn a_spare_over_layers_its_image_no_longer_has_goes_at_the_next_refill() {
        use super::super::overlay::{MountCall, RecordingMounter};
        let tmp = tempfile::tempdir().expect("tempdir");
        let fake = Arc::new(RecordingMounter::default());
        let store = ImageStore::open_with_mounter(StoreConfig::new(tmp.path()), fake.clone())
            .expect("open");
        let spares = tmp.path().join("spares");
        let list = || -> Vec<PathBuf> {
            std::fs::read_dir(&spares)
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect()
        };
        let old = fake_image(&store, 1);
        store.write_image(&old).expect("image record");
        store.compose_rootfs(&old, "web-1").await.expect("compose");
        store.refill_spares().await;
        let before = list();
        assert_eq!(before.len(), SPARES_PER_IMAGE);
        // The tag moved: the same reference over other layers.
        let new = fake_image(&store, 2);
        assert_eq!(new.reference, old.reference);
        store.write_image(&new).expect("image record");
        store.compose_rootfs(&new, "web-2").await.expect("compose");
        assert_eq!(
            list().len(),
            SPARES_PER_IMAGE,
            "no spare of the old layers taken"
        );
        store.refill_spares().await;
        let after = list();
        assert_eq!(after.len(), SPARES_PER_IMAGE);
        for d in &before {
            assert!(!d.exists(), "{} left", d.display());
            let unmount = MountCall::Unmount {
                target: d.join("rootfs"),
            };
            assert!(
                fake.calls().contains(&unmount),
                "{} not unmounted",
                d.display()
            );
        }
    }

    #[tokio::test]
    async fn spares_are_composed_ahead_taken_by_the_next_compose_and_dropped_with_their_image() {
        use super::super::overlay::{MountCall, RecordingMounter};
        let tmp = tempfile::tempdir().expect("tempdir");
        let fake = Arc::new(RecordingMounter::default());
        let mut cfg = StoreConfig::new(tmp.path());
        cfg.mount_points = vec![
            MountPoint {
                path: "/proc".into(),
                file: false,
            },
            MountPoint {
                path: "/etc/resolv.conf".into(),
                file: true,
            },
        ];
        let store = ImageStore::open_with_mounter(cfg.clone(), fake.clone()).expect("open");
        let img = fake_image(&store, 2);
        store.write_image(&img).expect("image record");
        // Nothing composed yet: no image to make spares of.
        store.refill_spares().await;
        assert!(fake.calls().is_empty());
        store.compose_rootfs(&img, "web-1").await.expect("compose");
        // The mount points are in their layer, the topmost lower of every mount; no instance
        // or spare makes its own.
        let points = store.points_dir(&img.layers);
        assert!(points.join("proc").is_dir() && points.join("etc/resolv.conf").is_file());
        let on_points = |calls: Vec<MountCall>| {
            calls.iter().all(|c| match c {
                MountCall::Mount { lower, upper, .. } => {
                    lower.first() == Some(&points)
                        && std::fs::read_dir(upper).map_or(0, |d| d.count()) == 0
                }
                MountCall::Unmount { .. } => true,
            })
        };
        store.refill_spares().await;
        let spares = tmp.path().join("spares");
        assert_eq!(
            std::fs::read_dir(&spares).unwrap().count(),
            SPARES_PER_IMAGE
        );
        let mounts = fake.calls().len();
        assert_eq!(mounts, 1 + SPARES_PER_IMAGE);

        // The next compose takes one: renamed into place, nothing mounted, recorded as its.
        let second = store.compose_rootfs(&img, "web-2").await.expect("compose");
        let inst = tmp.path().join("instances/web-2");
        assert_eq!(second.path, inst.join("rootfs"));
        assert_eq!(fake.calls().len(), mounts);
        assert!(on_points(fake.calls()), "{:?}", fake.calls());
        assert_eq!(
            std::fs::read_dir(&spares).unwrap().count(),
            SPARES_PER_IMAGE - 1
        );
        let users: Vec<String> = store
            .instances()
            .unwrap()
            .into_iter()
            .map(|(i, _)| i)
            .collect();
        assert_eq!(users.len(), 2);
        assert!(users.contains(&"web-2".to_owned()), "{users:?}");
        // Never over an instance that has one.
        let err = store
            .compose_rootfs(&img, "web-2")
            .await
            .expect_err("exists");
        assert!(matches!(err, ImageError::InstanceExists(_)), "{err}");

        // GC keeps the mount points' layer of an image it keeps.
        store.gc(u64::MAX).await.expect("gc");
        assert!(points.join("proc").is_dir());

        // Removing the image (its instances gone) drops its spares, unmounted first, and the
        // next GC its mount points' layer.
        for i in ["web-1", "web-2"] {
            assert!(store.release_rootfs(i).is_empty());
        }
        store.remove_image(&img.reference).await.expect("remove");
        assert_eq!(std::fs::read_dir(&spares).unwrap().count(), 0);
        store.gc(u64::MAX).await.expect("gc");
        assert!(!points.exists());
        let unmounts = fake
            .calls()
            .iter()
            .filter(|c| matches!(c, MountCall::Unmount { target } if target.starts_with(&spares)))
            .count();
        assert!(unmounts >= 1, "{:?}", fake.calls());

        // A spare an earlier process left goes when the store opens.
        std::fs::create_dir_all(spares.join("7/rootfs")).unwrap();
        drop(store);
        let _again = ImageStore::open_with_mounter(cfg, fake.clone()).expect("open");
        assert_eq!(std::fs::read_dir(&spares).unwrap().count(), 0);
        assert_eq!(
            fake.calls().last(),
            Some(&MountCall::Unmount {
                target: spares.join("7/rootfs")
            })
        );
    }

    #[test]
    fn instance_ids_are_checked() {
        for bad in ["", "..", ".x", "a/b", "a b"] {
            assert!(check_instance_id(bad).is_err(), "{bad:?}");
        }
        check_instance_id("web-3_a.b").expect("valid");
    }
}
