//! The registry's filesystem: content-addressed blobs shared by every repository, upload
//! sessions, and each repository's links, tags and referrers. Layout under the root:
//!
//! ```text
//! blobs/sha256/<hex>                         content (layers, configs, manifests), deduplicated
//! uploads/<id>/{meta.json,data}               upload sessions (survive restarts, expire)
//! repos/<repo>/_layers/<hex>                  the repository may serve this blob
//! repos/<repo>/_manifests/<hex>               a manifest of the repository (holds its media type)
//! repos/<repo>/_tags/<tag>                    the digest a tag points to
//! repos/<repo>/_referrers/<subject>/<hex>     manifests whose subject is <subject>
//! repos/<repo>/_public                        present: anyone may pull the repository
//! tmp/                                        files being written, renamed into place
//! locks/gc                                    flock: shared by linkers, exclusive for GC
//! locks/usage-<tenant>                        flock + the tenant's usage generation
//! token.key                                   registry token signing key (see `auth`)
//! ```
//!
//! Every file that becomes visible is written elsewhere first, fsynced and renamed, so a
//! reader sees all of it or nothing. Repository components never start with `_`, so the
//! `_…` directories cannot collide with nested repository names.
//!
//! Several processes may serve one root (API servers sharing a directory): everything they
//! must agree on is on disk, and the two orderings that matter hold across processes through
//! file locks ([`locks`]): no blob is collected between a request's check that it exists and
//! its link, and a tenant's quota is checked against every process's links.

mod gc;
mod locks;

use std::collections::{HashMap, HashSet};
use std::io::SeekFrom;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use ring::digest::{Context as Sha256, SHA256};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt, BufWriter};

use crate::auth::now;
use crate::error::{Code, RegistryError, Result};
use crate::manifest::{self, ReferrerInfo};
use crate::names::{Digest, Reference, Repo};
use crate::usage::TenantUsage;
use locks::FileLock;

pub use gc::GcReport;

/// How a chunk declares itself: its `Content-Range` and `Content-Length`, when sent.
#[derive(Clone, Copy, Debug, Default)]
pub struct ChunkHeaders {
    pub range: Option<(u64, u64)>,
    pub length: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
struct UploadMeta {
    repo: String,
    created: u64,
}

/// The in-memory side of an upload: its size and, while every byte went through this
/// process, the running hash (after a restart the data is hashed again at the end). Blob
/// hashing uses ring's SHA-256 (assembly; about twice the `sha2` crate's speed on hosts
/// without SHA extensions), manifests the `sha2` crate.
struct Session {
    repo: String,
    created: u64,
    size: u64,
    hasher: Option<Sha256>,
}

impl Session {
    /// The upload's data is `size` bytes on disk: when another process appended since this
    /// one did, continue from there and hash the whole data at the end.
    fn continue_at(&mut self, size: u64) {
        if size != self.size {
            self.size = size;
            self.hasher = (size == 0).then(|| Sha256::new(&SHA256));
        }
    }
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("repo", &self.repo)
            .field("size", &self.size)
            .field("hashing", &self.hasher.is_some())
            .finish_non_exhaustive()
    }
}

/// A stored manifest.
#[derive(Clone, Debug)]
pub struct Manifest {
    pub digest: Digest,
    pub media_type: String,
    pub body: Bytes,
}

/// A tenant's usage, loaded from disk on first use (`loaded` false: count again), and the
/// generation of the tenant's links it was counted at.
#[derive(Debug, Default)]
struct UsageSlot {
    loaded: bool,
    generation: u64,
    usage: TenantUsage,
}

/// A tenant's usage, held for a check and a change: this process's slot and the tenant's
/// lock file. Every change of the tenant's links made under it moves the generation in the
/// lock file on drop, so another process's count from before is recounted before its next
/// use.
struct UsageGuard {
    slot: tokio::sync::OwnedMutexGuard<UsageSlot>,
    lock: FileLock,
    changed: bool,
}

impl UsageGuard {
    fn usage(&self) -> &TenantUsage {
        &self.slot.usage
    }

    /// Counts one more link to blob `hex`.
    fn add(&mut self, hex: &str, size: u64) {
        self.slot.usage.add(hex, size);
        self.changed = true;
    }

    /// Counts one link to blob `hex` fewer.
    fn remove(&mut self, hex: &str) {
        self.slot.usage.remove(hex);
        self.changed = true;
    }

    /// The tenant's links changed wholesale: count again from disk next time, here and in
    /// every other process.
    fn forget(&mut self) {
        self.slot.loaded = false;
        self.slot.usage = TenantUsage::default();
        self.changed = true;
    }
}

impl Drop for UsageGuard {
    fn drop(&mut self) {
        if !self.changed {
            return;
        }
        let next = self.slot.generation.wrapping_add(1);
        match self.lock.set_counter(next) {
            Ok(()) => self.slot.generation = next,
            // The other processes may not learn of the change: count again here, and hope
            // the next change gets through to them.
            Err(e) => {
                tracing::warn!(error = %e, "registry: recording a usage change");
                self.slot.loaded = false;
            }
        }
    }
}

/// How much more of an upload that went over its tenant's quota is read (and dropped)
/// before the refusal is sent.
const QUOTA_DRAIN: u64 = 64 << 20;

#[derive(Debug)]
pub struct Storage {
    root: PathBuf,
    upload_ttl: Duration,
    sessions: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Session>>>>,
    /// Per tenant; held while a link is checked against the quota and created.
    usage: Mutex<HashMap<String, Arc<tokio::sync::Mutex<UsageSlot>>>>,
    /// Read-held by every step that makes a blob reachable (checks it exists, links it);
    /// write-held by garbage collection while it unlinks and deletes, so a blob is never
    /// deleted between another request's check and its link. In front of `locks/gc`, which
    /// orders the same steps across processes.
    gc: tokio::sync::RwLock<()>,
}

/// Held from a check that a blob exists until its link is written: this process's and every
/// process's collection waits ([`Storage::gc_shared`]).
struct GcShared<'a> {
    _local: tokio::sync::RwLockReadGuard<'a, ()>,
    _file: FileLock,
}

/// One repository as the API lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RepoInfo {
    pub name: String,
    pub public: bool,
    /// `(tag, manifest digest)`, sorted by tag.
    pub tags: Vec<(String, String)>,
    pub manifests: usize,
    /// Bytes of the distinct blobs the repository links.
    pub size: u64,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> RegistryError {
    let what = what.into();
    move |e| RegistryError::internal(what, e)
}

fn not_found(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::NotFound
}

async fn exists(p: &Path) -> bool {
    tokio::fs::try_exists(p).await.unwrap_or(false)
}

async fn sync_dir(dir: &Path) {
    let dir = dir.to_owned();
    let _ = tokio::task::spawn_blocking(move || std::fs::File::open(dir)?.sync_all()).await;
}

impl Storage {
    pub fn new(root: PathBuf, upload_ttl: Duration) -> Self {
        Self {
            root,
            upload_ttl,
            sessions: Mutex::new(HashMap::new()),
            usage: Mutex::new(HashMap::new()),
            gc: tokio::sync::RwLock::new(()),
        }
    }

    fn lock_path(&self, name: &str) -> PathBuf {
        self.root.join("locks").join(name)
    }

    /// The collection's lock, shared: held by every step that makes a blob reachable.
    async fn gc_shared(&self) -> Result<GcShared<'_>> {
        let local = self.gc.read().await;
        let file = FileLock::acquire(self.lock_path("gc"), false)
            .await
            .map_err(io("lock the registry for a link"))?;
        Ok(GcShared {
            _local: local,
            _file: file,
        })
    }

    /// The collection's lock, exclusive: no step that makes a blob reachable is under way in
    /// any process while it is held.
    async fn gc_exclusive(&self) -> Result<(tokio::sync::RwLockWriteGuard<'_, ()>, FileLock)> {
        let local = self.gc.write().await;
        let file = FileLock::acquire(self.lock_path("gc"), true)
            .await
            .map_err(io("lock the registry for garbage collection"))?;
        Ok((local, file))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn blob_path(&self, d: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(d.hex())
    }
    fn repo_dir(&self, r: &Repo) -> PathBuf {
        self.root.join("repos").join(r.as_str())
    }
    fn layer_link(&self, r: &Repo, d: &Digest) -> PathBuf {
        self.repo_dir(r).join("_layers").join(d.hex())
    }
    fn manifest_link(&self, r: &Repo, d: &Digest) -> PathBuf {
        self.repo_dir(r).join("_manifests").join(d.hex())
    }
    fn tag_path(&self, r: &Repo, tag: &str) -> PathBuf {
        self.repo_dir(r).join("_tags").join(tag)
    }
    fn upload_dir(&self, id: &str) -> PathBuf {
        self.root.join("uploads").join(id)
    }

    /// A repository exists once something was linked into it (a parent of nested
    /// repositories is only a directory).
    pub async fn repo_exists(&self, r: &Repo) -> bool {
        let dir = self.repo_dir(r);
        exists(&dir.join("_layers")).await || exists(&dir.join("_manifests")).await
    }

    // ---- usage and quota

    fn usage_slot(&self, tenant: &str) -> Arc<tokio::sync::Mutex<UsageSlot>> {
        let mut map = self.usage.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(tenant.to_owned()).or_default().clone()
    }

    /// The tenant's usage, held until dropped: counted again from its links when not known
    /// yet or when another process changed them since (the generation in the tenant's lock
    /// file moved).
    async fn usage_guard(&self, tenant: &str) -> Result<UsageGuard> {
        if !plain_tenant(tenant) {
            return Err(RegistryError::new(
                Code::NameInvalid,
                format!("{tenant:?} is not a tenant name"),
            ));
        }
        let mut slot = self.usage_slot(tenant).lock_owned().await;
        let lock = FileLock::acquire(self.lock_path(&format!("usage-{tenant}")), true)
            .await
            .map_err(io(format!("lock the registry usage of tenant {tenant}")))?;
        let generation = lock.counter();
        if !slot.loaded || slot.generation != generation {
            let mut usage = TenantUsage::default();
            let base = self.root.join("repos").join(tenant);
            for hex in linked_blobs(&base).await {
                if let Ok(m) = tokio::fs::metadata(self.root.join("blobs/sha256").join(&hex)).await
                {
                    usage.add(&hex, m.len());
                }
            }
            slot.usage = usage;
            slot.loaded = true;
            slot.generation = generation;
        }
        Ok(UsageGuard {
            slot,
            lock,
            changed: false,
        })
    }

    /// Bytes of the distinct blobs tenant `t`'s repositories link.
    pub async fn tenant_usage(&self, tenant: &str) -> Result<u64> {
        Ok(self.usage_guard(tenant).await?.usage().bytes())
    }

    /// How large an upload to `r` may grow while it arrives. With its digest known (the
    /// last chunk, or a monolithic upload): what the tenant has left, or no bound for content
    /// it already holds. Without (a `PATCH`): the whole quota, since the content may turn
    /// out to be held already; linking checks exactly either way.
    async fn upload_room(
        &self,
        r: &Repo,
        quota: Option<u64>,
        want: Option<&Digest>,
    ) -> Result<Option<u64>> {
        let Some(quota) = quota else {
            return Ok(None);
        };
        let Some(want) = want else {
            return Ok(Some(quota));
        };
        let g = self.usage_guard(r.tenant()).await?;
        let u = g.usage();
        Ok((!u.holds(want.hex())).then(|| quota.saturating_sub(u.bytes())))
    }

    // ---- repositories

    pub async fn is_public(&self, r: &Repo) -> bool {
        exists(&self.repo_dir(r).join("_public")).await
    }

    /// Marks `r` public (anyone may pull it) or private.
    pub async fn set_public(&self, r: &Repo, public: bool) -> Result<()> {
        if !self.repo_exists(r).await {
            return Err(crate::auth::name_unknown(r));
        }
        let marker = self.repo_dir(r).join("_public");
        if public {
            self.write_atomic(&marker, b"").await
        } else {
            match tokio::fs::remove_file(&marker).await {
                Ok(()) => Ok(()),
                Err(e) if not_found(&e) => Ok(()),
                Err(e) => Err(io(format!("make {r} private"))(e)),
            }
        }
    }

    /// The repositories of `tenant` with their tags and sizes, sorted by name.
    pub async fn repositories(&self, tenant: &str) -> Result<Vec<RepoInfo>> {
        let mut out = Vec::new();
        for name in self.catalog(Some(tenant)).await {
            let Ok(r) = Repo::parse(&name) else { continue };
            if !self.repo_exists(&r).await {
                continue;
            }
            let mut tags = Vec::new();
            for t in self.tags(&r).await.unwrap_or_default() {
                if let Ok(d) = tokio::fs::read_to_string(self.tag_path(&r, &t)).await {
                    tags.push((t, d.trim().to_owned()));
                }
            }
            let dir = self.repo_dir(&r);
            let mut blobs: HashSet<String> =
                list_dir(&dir.join("_layers")).await.into_iter().collect();
            let manifests = list_dir(&dir.join("_manifests")).await;
            let count = manifests.len();
            blobs.extend(manifests);
            let mut size = 0;
            for hex in blobs {
                if let Ok(m) = tokio::fs::metadata(self.root.join("blobs/sha256").join(hex)).await {
                    size += m.len();
                }
            }
            out.push(RepoInfo {
                public: self.is_public(&r).await,
                name,
                tags,
                manifests: count,
                size,
            });
        }
        Ok(out)
    }

    /// Deletes repository `r`: its tags, manifests and links (nested repositories stay).
    /// The content goes with the next garbage collection unless others link it.
    pub async fn delete_repo(&self, r: &Repo) -> Result<()> {
        if !self.repo_exists(r).await {
            return Err(crate::auth::name_unknown(r));
        }
        let dir = self.repo_dir(r);
        let mut usage = self.usage_guard(r.tenant()).await?;
        usage.forget();
        for entry in list_dir(&dir).await {
            if !entry.starts_with('_') {
                continue;
            }
            let p = dir.join(&entry);
            let res = match tokio::fs::metadata(&p).await {
                Ok(m) if m.is_dir() => tokio::fs::remove_dir_all(&p).await,
                Ok(_) => tokio::fs::remove_file(&p).await,
                Err(e) => Err(e),
            };
            if let Err(e) = res
                && !not_found(&e)
            {
                return Err(io(format!("delete repository {r}"))(e));
            }
        }
        let _ = tokio::fs::remove_dir(&dir).await; // only when no nested repository is left
        Ok(())
    }

    /// Deletes every repository of `tenant` (the tenant itself is gone).
    pub async fn delete_tenant(&self, tenant: &str) -> Result<()> {
        if !plain_tenant(tenant) {
            return Ok(());
        }
        let mut usage = self.usage_guard(tenant).await?;
        usage.forget();
        match tokio::fs::remove_dir_all(self.root.join("repos").join(tenant)).await {
            Ok(()) => Ok(()),
            Err(e) if not_found(&e) => Ok(()),
            Err(e) => Err(io(format!("delete repositories of tenant {tenant}"))(e)),
        }
    }

    /// Writes `bytes` to `dest` atomically (temp file, fsync, rename).
    async fn write_atomic(&self, dest: &Path, bytes: &[u8]) -> Result<()> {
        let what = || format!("write {}", dest.display());
        let tmp_dir = self.root.join("tmp");
        tokio::fs::create_dir_all(&tmp_dir)
            .await
            .map_err(io(what()))?;
        if let Some(parent) = dest.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(io(what()))?;
        }
        let tmp = tmp_dir.join(uuid::Uuid::new_v4().to_string());
        let mut f = tokio::fs::File::create(&tmp).await.map_err(io(what()))?;
        let done = async {
            f.write_all(bytes).await?;
            f.sync_all().await?;
            tokio::fs::rename(&tmp, dest).await
        }
        .await;
        if let Err(e) = done {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(io(what())(e));
        }
        Ok(())
    }

    // ---- blobs

    /// The size of blob `d` if repository `r` may serve it.
    pub async fn blob_size(&self, r: &Repo, d: &Digest) -> Result<Option<u64>> {
        if !exists(&self.layer_link(r, d)).await && !exists(&self.manifest_link(r, d)).await {
            return Ok(None);
        }
        match tokio::fs::metadata(self.blob_path(d)).await {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if not_found(&e) => Ok(None),
            Err(e) => Err(io(format!("stat blob {d}"))(e)),
        }
    }

    pub async fn open_blob(&self, d: &Digest) -> Result<tokio::fs::File> {
        tokio::fs::File::open(self.blob_path(d))
            .await
            .map_err(|e| match not_found(&e) {
                true => RegistryError::new(Code::BlobUnknown, format!("blob {d} is unknown")),
                false => io(format!("open blob {d}"))(e),
            })
    }

    /// Links stored blob `d` into `r`, within the tenant's `quota`. The caller holds the
    /// collection's read lock from before it knew the blob exists.
    async fn link_layer(&self, r: &Repo, d: &Digest, quota: Option<u64>) -> Result<()> {
        let link = self.layer_link(r, d);
        let mut u = self.usage_guard(r.tenant()).await?;
        if exists(&link).await {
            return Ok(());
        }
        let size = match tokio::fs::metadata(self.blob_path(d)).await {
            Ok(m) => m.len(),
            Err(e) if not_found(&e) => {
                return Err(RegistryError::new(
                    Code::BlobUnknown,
                    format!("blob {d} is unknown"),
                ));
            }
            Err(e) => return Err(io(format!("stat blob {d}"))(e)),
        };
        u.usage().admit(r.tenant(), d.hex(), size, quota)?;
        let what = format!("link blob {d} into {r}");
        tokio::fs::create_dir_all(link.parent().unwrap_or(&self.root))
            .await
            .map_err(io(what.clone()))?;
        tokio::fs::File::create(&link).await.map_err(io(what))?;
        u.add(d.hex(), size);
        Ok(())
    }

    /// Makes blob `d` of repository `from` available in `r` without copying it. False when
    /// `from` does not have it.
    pub async fn mount(
        &self,
        r: &Repo,
        from: &Repo,
        d: &Digest,
        quota: Option<u64>,
    ) -> Result<bool> {
        let _gc = self.gc_shared().await?;
        if self.blob_size(from, d).await?.is_none() {
            return Ok(false);
        }
        self.link_layer(r, d, quota).await?;
        Ok(true)
    }

    /// Unlinks blob `d` from `r` (the content stays for other repositories). Refused while
    /// a manifest of `r` refers to it.
    pub async fn delete_blob(&self, r: &Repo, d: &Digest) -> Result<()> {
        if let Some(m) = self.references(r).await?.get(d.hex()) {
            return Err(RegistryError::new(
                Code::Denied,
                format!("blob {d} is referenced by manifest {m} of {r}: delete the manifest first"),
            ));
        }
        let mut u = self.usage_guard(r.tenant()).await?;
        match tokio::fs::remove_file(self.layer_link(r, d)).await {
            Ok(()) => {
                u.remove(d.hex());
                Ok(())
            }
            Err(e) if not_found(&e) => Err(RegistryError::new(
                Code::BlobUnknown,
                format!("blob {d} is unknown to repository {r}"),
            )),
            Err(e) => Err(io(format!("unlink blob {d} from {r}"))(e)),
        }
    }

    /// The blobs the manifests of `r` refer to (configs, layers, child manifests), each
    /// with one manifest that does.
    async fn references(&self, r: &Repo) -> Result<HashMap<String, Digest>> {
        let mut out = HashMap::new();
        for hex in list_dir(&self.repo_dir(r).join("_manifests")).await {
            let d = Digest::from_hex(&hex);
            let m = match self.get_manifest(r, &Reference::Digest(d.clone())).await {
                Ok(m) => m,
                Err(e) if e.code == Code::ManifestUnknown => continue, // deleted meanwhile
                Err(e) => return Err(e),
            };
            let parsed = manifest::parse(&m.body, Some(&m.media_type), &format!("{r}@{d}"))?;
            for b in parsed.blobs.iter().chain(&parsed.manifests) {
                out.entry(b.hex().to_owned()).or_insert_with(|| d.clone());
            }
        }
        Ok(out)
    }

    // ---- uploads

    /// Starts an upload session for `r` and returns its id.
    pub async fn start_upload(&self, r: &Repo) -> Result<String> {
        let id = uuid::Uuid::new_v4().to_string();
        let dir = self.upload_dir(&id);
        let what = format!("start upload to {r}");
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(io(what.clone()))?;
        let created = now();
        let meta = serde_json::to_vec(&UploadMeta {
            repo: r.to_string(),
            created,
        })
        .unwrap_or_default();
        tokio::fs::write(dir.join("meta.json"), meta)
            .await
            .map_err(io(what.clone()))?;
        tokio::fs::File::create(dir.join("data"))
            .await
            .map_err(io(what))?;
        let session = Session {
            repo: r.to_string(),
            created,
            size: 0,
            hasher: Some(Sha256::new(&SHA256)),
        };
        self.lock_sessions()
            .insert(id.clone(), Arc::new(tokio::sync::Mutex::new(session)));
        Ok(id)
    }

    fn lock_sessions(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, Arc<tokio::sync::Mutex<Session>>>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn unknown_upload(r: &Repo, id: &str) -> RegistryError {
        RegistryError::new(
            Code::BlobUploadUnknown,
            format!("upload {id} is unknown to repository {r}"),
        )
    }

    /// The session `id` of repository `r` (loaded from disk after a restart).
    async fn session(&self, r: &Repo, id: &str) -> Result<Arc<tokio::sync::Mutex<Session>>> {
        let found = self.lock_sessions().get(id).cloned();
        let s = match found {
            Some(s) => s,
            None => {
                let dir = self.upload_dir(id);
                let meta: UploadMeta = match tokio::fs::read(dir.join("meta.json")).await {
                    Ok(b) => serde_json::from_slice(&b).map_err(|_| Self::unknown_upload(r, id))?,
                    Err(_) => return Err(Self::unknown_upload(r, id)),
                };
                let size = tokio::fs::metadata(dir.join("data"))
                    .await
                    .map_err(|_| Self::unknown_upload(r, id))?
                    .len();
                let s = Arc::new(tokio::sync::Mutex::new(Session {
                    repo: meta.repo,
                    created: meta.created,
                    size,
                    hasher: (size == 0).then(|| Sha256::new(&SHA256)),
                }));
                self.lock_sessions()
                    .entry(id.to_owned())
                    .or_insert(s)
                    .clone()
            }
        };
        {
            let g = s.lock().await;
            if g.repo != r.as_str() {
                return Err(Self::unknown_upload(r, id));
            }
            if g.created + self.upload_ttl.as_secs() < now() {
                drop(g);
                self.drop_upload(id).await;
                return Err(RegistryError::new(
                    Code::BlobUploadUnknown,
                    format!("upload {id} to repository {r} has expired"),
                ));
            }
        }
        Ok(s)
    }

    /// Opens the data of upload `id` for writing, locked against every other process (one
    /// chunk at a time, whichever server takes it).
    async fn open_upload(&self, r: &Repo, id: &str) -> Result<tokio::fs::File> {
        let path = self.upload_dir(id).join("data");
        let opened = tokio::task::spawn_blocking(move || {
            let f = std::fs::OpenOptions::new().write(true).open(path)?;
            f.lock()?;
            std::io::Result::Ok(f)
        })
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r);
        match opened {
            Ok(f) => Ok(tokio::fs::File::from_std(f)),
            Err(e) if not_found(&e) => Err(Self::unknown_upload(r, id)),
            Err(e) => Err(io(format!("upload {id}: open"))(e)),
        }
    }

    async fn drop_upload(&self, id: &str) {
        self.lock_sessions().remove(id);
        let _ = tokio::fs::remove_dir_all(self.upload_dir(id)).await;
    }

    /// Bytes received so far by upload `id`.
    pub async fn upload_size(&self, r: &Repo, id: &str) -> Result<u64> {
        let s = self.session(r, id).await?;
        let mut g = s.lock().await;
        // What is on disk: another process may have taken chunks since this one did.
        let on_disk = tokio::fs::metadata(self.upload_dir(id).join("data"))
            .await
            .map_err(|_| Self::unknown_upload(r, id))?
            .len();
        g.continue_at(on_disk);
        Ok(g.size)
    }

    pub async fn cancel_upload(&self, r: &Repo, id: &str) -> Result<()> {
        let s = self.session(r, id).await?;
        let _g = s.lock().await;
        self.drop_upload(id).await;
        Ok(())
    }

    /// Appends a chunk to upload `id`; returns the new size. A chunk that does not start at
    /// the current end, is shorter or longer than it declares, or breaks off is refused and
    /// leaves the upload exactly as it was.
    /// `quota` is the tenant's: a chunk that would take the upload past what the tenant
    /// could still link is refused as it arrives.
    pub async fn append<S, E>(
        &self,
        r: &Repo,
        id: &str,
        h: ChunkHeaders,
        body: S,
        quota: Option<u64>,
    ) -> Result<u64>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let s = self.session(r, id).await?;
        let mut g = s.lock().await;
        let room = self.upload_room(r, quota, None).await?;
        let mut file = self.open_upload(r, id).await?;
        self.append_locked(r, id, &mut g, &mut file, h, body, room)
            .await
    }

    /// Appends to the upload's data, `file`, opened (and locked) by [`Self::open_upload`].
    #[allow(clippy::too_many_arguments)]
    async fn append_locked<S, E>(
        &self,
        r: &Repo,
        id: &str,
        g: &mut Session,
        file: &mut tokio::fs::File,
        h: ChunkHeaders,
        mut body: S,
        room: Option<u64>,
    ) -> Result<u64>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        // Another process may have taken chunks of this upload since this one last did
        // (servers behind one address): continue from what is on disk.
        let on_disk = file
            .metadata()
            .await
            .map_err(io(format!("upload {id}: stat")))?
            .len();
        g.continue_at(on_disk);
        let start = g.size;
        if let Some((a, b)) = h.range {
            if a != start || b < a {
                return Err(RegistryError::new(
                    Code::RangeInvalid,
                    format!("upload {id} to {r}: chunk {a}-{b} does not continue at byte {start}"),
                ));
            }
            if let Some(len) = h.length
                && len != b - a + 1
            {
                return Err(RegistryError::new(
                    Code::RangeInvalid,
                    format!(
                        "upload {id} to {r}: Content-Range {a}-{b} disagrees with Content-Length {len}"
                    ),
                ));
            }
        }
        let mut n: u64 = 0;
        let written: Result<()> = async {
            file.seek(SeekFrom::Start(start))
                .await
                .map_err(io(format!("upload {id}: seek")))?;
            let mut w = BufWriter::with_capacity(1 << 20, &mut *file);
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| {
                    RegistryError::new(
                        Code::BlobUploadInvalid,
                        format!("upload {id} to {r}: body broke off: {e}"),
                    )
                })?;
                n += chunk.len() as u64;
                if let Some(room) = room
                    && start + n > room
                {
                    // Read on (not kept) so that the client, still sending, gets the
                    // answer instead of a broken pipe; a little only.
                    let mut drained = 0u64;
                    while drained < QUOTA_DRAIN
                        && let Some(Ok(c)) = body.next().await
                    {
                        drained += c.len() as u64;
                    }
                    return Err(crate::usage::no_room(r.tenant(), room));
                }
                if let Some(hs) = g.hasher.as_mut() {
                    hs.update(&chunk);
                }
                w.write_all(&chunk)
                    .await
                    .map_err(io(format!("upload {id}: write")))?;
            }
            w.flush().await.map_err(io(format!("upload {id}: write")))?;
            let declared = h.range.map(|(a, b)| b - a + 1).or(h.length);
            if let Some(want) = declared
                && want != n
            {
                return Err(RegistryError::new(
                    if h.range.is_some() {
                        Code::RangeInvalid
                    } else {
                        Code::BlobUploadInvalid
                    },
                    format!("upload {id} to {r}: chunk declared {want} bytes but carried {n}"),
                ));
            }
            Ok(())
        }
        .await;
        if let Err(e) = written {
            let _ = file.set_len(start).await;
            if n > 0 {
                g.hasher = None; // it saw bytes that are gone: hash again at the end
            }
            return Err(e);
        }
        g.size = start + n;
        Ok(g.size)
    }

    /// Completes upload `id` with its last chunk: verifies `want`, then moves the content
    /// into the blob store and links it into `r`. A mismatch deletes the whole upload.
    pub async fn finish<S, E>(
        &self,
        r: &Repo,
        id: &str,
        want: &Digest,
        h: ChunkHeaders,
        body: S,
        quota: Option<u64>,
    ) -> Result<u64>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let s = self.session(r, id).await?;
        let mut g = s.lock().await;
        let room = self.upload_room(r, quota, Some(want)).await?;
        // Locked until the content is verified and stored: no other process appends to it
        // in between.
        let mut file = self.open_upload(r, id).await?;
        let size = self
            .append_locked(r, id, &mut g, &mut file, h, body, room)
            .await?;
        let path = self.upload_dir(id).join("data");
        let got = match g.hasher.take() {
            Some(hs) => hex::encode(hs.finish()),
            None => hash_file(&path)
                .await
                .map_err(io(format!("upload {id}: hash")))?,
        };
        if got != want.hex() {
            self.drop_upload(id).await;
            return Err(RegistryError::new(
                Code::DigestInvalid,
                format!("upload {id} to {r}: content is sha256:{got}, not {want}; nothing kept"),
            ));
        }
        let dest = self.blob_path(want);
        let what = format!("store blob {want}");
        if !exists(&dest).await {
            // Flushed before the lock: a collection waits only for the rename and the link.
            file.sync_all().await.map_err(io(what.clone()))?;
        }
        let linked = async {
            let _gc = self.gc_shared().await?;
            if !exists(&dest).await {
                let dir = dest.parent().unwrap_or(&self.root).to_owned();
                tokio::fs::create_dir_all(&dir)
                    .await
                    .map_err(io(what.clone()))?;
                tokio::fs::rename(&path, &dest).await.map_err(io(what))?;
                sync_dir(&dir).await;
            }
            self.link_layer(r, want, quota).await
        }
        .await;
        // Stored or refused, the session is over (an unlinked blob goes with the next
        // collection).
        self.drop_upload(id).await;
        linked?;
        Ok(size)
    }

    /// Deletes upload sessions older than the time to live.
    pub async fn purge_expired_uploads(&self) -> usize {
        let Ok(mut rd) = tokio::fs::read_dir(self.root.join("uploads")).await else {
            return 0;
        };
        let mut n = 0;
        while let Ok(Some(e)) = rd.next_entry().await {
            let meta = tokio::fs::read(e.path().join("meta.json")).await.ok();
            let created = meta
                .and_then(|b| serde_json::from_slice::<UploadMeta>(&b).ok())
                .map(|m| m.created)
                .unwrap_or(0);
            if created + self.upload_ttl.as_secs() < now() {
                let id = e.file_name().to_string_lossy().into_owned();
                self.drop_upload(&id).await;
                n += 1;
            }
        }
        n
    }

    // ---- manifests and tags

    async fn resolve(&self, r: &Repo, reference: &Reference) -> Result<Digest> {
        if !self.repo_exists(r).await {
            return Err(crate::auth::name_unknown(r));
        }
        match reference {
            Reference::Digest(d) => Ok(d.clone()),
            Reference::Tag(t) => match tokio::fs::read_to_string(self.tag_path(r, t)).await {
                Ok(s) => Digest::parse(s.trim()),
                Err(e) if not_found(&e) => Err(RegistryError::new(
                    Code::ManifestUnknown,
                    format!("manifest {r}:{t} is unknown"),
                )),
                Err(e) => Err(io(format!("read tag {r}:{t}"))(e)),
            },
        }
    }

    pub async fn get_manifest(&self, r: &Repo, reference: &Reference) -> Result<Manifest> {
        let digest = self.resolve(r, reference).await?;
        let unknown = || {
            RegistryError::new(
                Code::ManifestUnknown,
                format!("manifest {r}@{digest} is unknown"),
            )
        };
        let media_type = match tokio::fs::read_to_string(self.manifest_link(r, &digest)).await {
            Ok(m) => m,
            Err(e) if not_found(&e) => return Err(unknown()),
            Err(e) => return Err(io(format!("read manifest {r}@{digest}"))(e)),
        };
        let body = match tokio::fs::read(self.blob_path(&digest)).await {
            Ok(b) => Bytes::from(b),
            Err(e) if not_found(&e) => return Err(unknown()),
            Err(e) => return Err(io(format!("read manifest {r}@{digest}"))(e)),
        };
        Ok(Manifest {
            digest,
            media_type,
            body,
        })
    }

    /// Validates and stores a manifest; returns its digest and subject.
    pub async fn put_manifest(
        &self,
        r: &Repo,
        reference: &Reference,
        content_type: Option<&str>,
        body: Bytes,
        quota: Option<u64>,
    ) -> Result<(Digest, Option<Digest>)> {
        let name = match reference {
            Reference::Tag(t) => format!("{r}:{t}"),
            Reference::Digest(d) => format!("{r}@{d}"),
        };
        let parsed = manifest::parse(&body, content_type, &name)?;
        let digest = Digest::from_hex(&hex::encode(sha2::Sha256::digest(&body)));
        if let Reference::Digest(d) = reference
            && *d != digest
        {
            return Err(RegistryError::new(
                Code::DigestInvalid,
                format!("manifest {name}: content is {digest}"),
            ));
        }
        let _gc = self.gc_shared().await?;
        for b in &parsed.blobs {
            if self.blob_size(r, b).await?.is_none() {
                return Err(RegistryError::new(
                    Code::ManifestBlobUnknown,
                    format!("manifest {name} references blob {b}, unknown to repository {r}"),
                ));
            }
        }
        for m in &parsed.manifests {
            if !exists(&self.manifest_link(r, m)).await {
                return Err(RegistryError::new(
                    Code::ManifestBlobUnknown,
                    format!("manifest {name} references manifest {m}, unknown to repository {r}"),
                ));
            }
        }
        {
            let mut u = self.usage_guard(r.tenant()).await?;
            let link = self.manifest_link(r, &digest);
            let new = !exists(&link).await;
            if new {
                u.usage()
                    .admit(r.tenant(), digest.hex(), body.len() as u64, quota)?;
            }
            let blob = self.blob_path(&digest);
            if !exists(&blob).await {
                self.write_atomic(&blob, &body).await?;
            }
            self.write_atomic(&link, parsed.media_type.as_bytes())
                .await?;
            if new {
                u.add(digest.hex(), body.len() as u64);
            }
        }
        if let Some(s) = &parsed.subject {
            let link = self
                .repo_dir(r)
                .join("_referrers")
                .join(s.hex())
                .join(digest.hex());
            self.write_atomic(&link, b"").await?;
        }
        if let Reference::Tag(t) = reference {
            self.write_atomic(&self.tag_path(r, t), digest.as_str().as_bytes())
                .await?;
        }
        Ok((digest, parsed.subject))
    }

    pub async fn delete_manifest(&self, r: &Repo, reference: &Reference) -> Result<()> {
        if !self.repo_exists(r).await {
            return Err(crate::auth::name_unknown(r));
        }
        match reference {
            Reference::Tag(t) => match tokio::fs::remove_file(self.tag_path(r, t)).await {
                Ok(()) => Ok(()),
                Err(e) if not_found(&e) => Err(RegistryError::new(
                    Code::ManifestUnknown,
                    format!("manifest {r}:{t} is unknown"),
                )),
                Err(e) => Err(io(format!("delete tag {r}:{t}"))(e)),
            },
            Reference::Digest(d) => {
                let mut u = self.usage_guard(r.tenant()).await?;
                match tokio::fs::remove_file(self.manifest_link(r, d)).await {
                    Ok(()) => u.remove(d.hex()),
                    Err(e) if not_found(&e) => {
                        return Err(RegistryError::new(
                            Code::ManifestUnknown,
                            format!("manifest {r}@{d} is unknown"),
                        ));
                    }
                    Err(e) => return Err(io(format!("delete manifest {r}@{d}"))(e)),
                }
                for t in self.tags(r).await.unwrap_or_default() {
                    let p = self.tag_path(r, &t);
                    if tokio::fs::read_to_string(&p).await.ok().as_deref() == Some(d.as_str()) {
                        let _ = tokio::fs::remove_file(p).await;
                    }
                }
                for subject in list_dir(&self.repo_dir(r).join("_referrers")).await {
                    let p = self
                        .repo_dir(r)
                        .join("_referrers")
                        .join(subject)
                        .join(d.hex());
                    let _ = tokio::fs::remove_file(p).await;
                }
                Ok(())
            }
        }
    }

    pub async fn tags(&self, r: &Repo) -> Result<Vec<String>> {
        if !self.repo_exists(r).await {
            return Err(crate::auth::name_unknown(r));
        }
        let mut tags = list_dir(&self.repo_dir(r).join("_tags")).await;
        tags.sort();
        Ok(tags)
    }

    /// Descriptors of the manifests in `r` whose subject is `subject`.
    pub async fn referrers(&self, r: &Repo, subject: &Digest) -> Result<Vec<serde_json::Value>> {
        let dir = self.repo_dir(r).join("_referrers").join(subject.hex());
        let mut names = list_dir(&dir).await;
        names.sort();
        let mut out = Vec::new();
        for hex in names {
            let d = Digest::from_hex(&hex);
            let Ok(m) = self.get_manifest(r, &Reference::Digest(d.clone())).await else {
                continue;
            };
            let info: ReferrerInfo = match serde_json::from_slice(&m.body) {
                Ok(i) => i,
                Err(_) => continue,
            };
            let artifact_type = info
                .artifact_type
                .or_else(|| info.config.and_then(|c| c.media_type));
            let mut desc = serde_json::json!({
                "mediaType": info.media_type.unwrap_or(m.media_type),
                "digest": d.as_str(),
                "size": m.body.len(),
            });
            if let Some(a) = artifact_type {
                desc["artifactType"] = a.into();
            }
            if let Some(a) = info.annotations {
                desc["annotations"] = a.into();
            }
            out.push(desc);
        }
        Ok(out)
    }

    /// Repository names, all or one tenant's, sorted.
    pub async fn catalog(&self, tenant: Option<&str>) -> Vec<String> {
        let base = self.root.join("repos");
        let start = match tenant {
            // An anonymous caller (empty tenant) or a name that is not one component sees nothing.
            Some(t) if t.is_empty() || t.contains('/') || t.starts_with('.') => return Vec::new(),
            Some(t) => vec![t.to_owned()],
            None => list_dir(&base).await,
        };
        let mut out = Vec::new();
        let mut stack = start;
        while let Some(rel) = stack.pop() {
            let entries = list_dir(&base.join(&rel)).await;
            if entries.iter().any(|e| e.starts_with('_')) {
                out.push(rel.clone());
            }
            for e in entries.into_iter().filter(|e| !e.starts_with('_')) {
                stack.push(format!("{rel}/{e}"));
            }
        }
        out.sort();
        out
    }
}

/// A tenant name that is one plain path component (usable under `repos/` and `locks/`).
fn plain_tenant(tenant: &str) -> bool {
    !(tenant.is_empty() || tenant.contains('/') || tenant.starts_with('.'))
}

async fn list_dir(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(mut rd) = tokio::fs::read_dir(dir).await {
        while let Ok(Some(e)) = rd.next_entry().await {
            out.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    out
}

/// The distinct blobs any repository links.
async fn linked_set(root: &Path) -> HashSet<String> {
    linked_blobs(&root.join("repos"))
        .await
        .into_iter()
        .collect()
}

/// Every link under `base` (a tenant's or all repositories): the blob names in the
/// `_layers` and `_manifests` directories of it and its nested repositories, a name once per
/// link.
async fn linked_blobs(base: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![base.to_owned()];
    while let Some(dir) = stack.pop() {
        for e in list_dir(&dir).await {
            match e.as_str() {
                "_layers" | "_manifests" => out.extend(list_dir(&dir.join(&e)).await),
                _ if e.starts_with('_') => {}
                _ => stack.push(dir.join(&e)),
            }
        }
    }
    out
}

async fn hash_file(path: &Path) -> std::io::Result<String> {
    let mut f = tokio::fs::File::open(path).await?;
    let mut h = Sha256::new(&SHA256);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finish()))
}
