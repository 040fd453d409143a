//! Whole images between an OCI layout and a registry (`hive push`, `hive pull`): walks the
//! manifest and, for an index, every platform's manifest; moves the blobs the other side
//! lacks, [`PARALLEL`] at a time; then the manifests, children before parents, the image's own
//! last (so the registry never holds a manifest whose content it lacks, and a layout never
//! lists an image whose blobs it lacks).
//!
//! It reads and writes through [`LayoutReader`], [`LayoutWriter`] and [`RegistryClient`] and
//! reports progress to a [`Progress`]; it prints nothing.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use futures_util::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};

use super::layout::{Descriptor, LayoutError, LayoutReader, LayoutWriter, REF_NAME, valid_digest};
use super::reference::Reference;
use super::registry::{OnBytes, RegistryClient, RegistryError};
use super::store::{INDEX_TYPES, MANIFEST_TYPES, doc_media_type};

/// Blobs moved at the same time.
pub const PARALLEL: usize = 4;

/// Indexes inside indexes deeper than this are refused (real images have one level).
const MAX_DEPTH: usize = 8;

/// What a transfer tells as it goes (progress bars); every method has a no-op default.
pub trait Progress: Send + Sync {
    /// The blob `digest` of `size` bytes is looked at.
    fn start(&self, _digest: &str, _size: u64) {}
    /// `bytes` more of it moved.
    fn advance(&self, _digest: &str, _bytes: u64) {}
    /// It is done: moved, or `skipped` because the other side had it.
    fn done(&self, _digest: &str, _skipped: bool) {}
}

/// A [`Progress`] that shows nothing.
#[derive(Debug)]
pub struct Quiet;
impl Progress for Quiet {}

/// What a push or a pull did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// The repository (without the registry host).
    pub repository: String,
    pub tag: Option<String>,
    /// The image's manifest (or index) digest.
    pub digest: String,
    pub media_type: String,
    /// Manifests and indexes, the image's own included.
    pub manifests: usize,
    /// Configs and layers.
    pub blobs: usize,
    /// Blobs the other side had already.
    pub skipped: usize,
    /// Bytes of the blobs moved.
    pub bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error("{action} {digest}: {source}")]
    Registry {
        action: &'static str,
        digest: String,
        #[source]
        source: RegistryError,
    },
    #[error("fetch manifest {reference}: {source}")]
    Fetch {
        reference: String,
        #[source]
        source: RegistryError,
    },
    #[error("manifest {digest}: {message}")]
    BadManifest { digest: String, message: String },
    #[error("{reference} is {actual}, not {expected}")]
    WrongDigest {
        reference: String,
        expected: String,
        actual: String,
    },
}

type Result<T, E = TransferError> = std::result::Result<T, E>;

/// A manifest or index with its content.
#[derive(Debug, Clone)]
struct Node {
    desc: Descriptor,
    bytes: Vec<u8>,
}

/// What a manifest or index refers to.
#[derive(Debug, Default)]
struct Refs {
    manifests: Vec<Descriptor>,
    blobs: Vec<Descriptor>,
}

/// The descriptors a manifest (config, layers) or an index (manifests) holds; digests are
/// checked here, before any becomes a URL or a file name.
fn refs_of(media_type: &str, digest: &str, bytes: &[u8]) -> Result<Refs> {
    #[derive(Deserialize)]
    struct Doc {
        manifests: Option<Vec<Descriptor>>,
        config: Option<Descriptor>,
        #[serde(default)]
        layers: Vec<Descriptor>,
    }
    let bad = |message: String| TransferError::BadManifest {
        digest: digest.to_owned(),
        message,
    };
    let doc: Doc = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
    let refs = if INDEX_TYPES.contains(&media_type) {
        Refs {
            manifests: doc
                .manifests
                .ok_or_else(|| bad("an index without manifests".into()))?,
            blobs: Vec::new(),
        }
    } else if MANIFEST_TYPES.contains(&media_type) {
        let config = doc
            .config
            .ok_or_else(|| bad("a manifest without config".into()))?;
        Refs {
            manifests: Vec::new(),
            blobs: std::iter::once(config).chain(doc.layers).collect(),
        }
    } else {
        return Err(bad(format!("unsupported media type {media_type:?}")));
    };
    if let Some(d) = refs
        .manifests
        .iter()
        .chain(&refs.blobs)
        .find(|d| !valid_digest(&d.digest))
    {
        return Err(bad(format!(
            "unsupported digest {:?} (only sha256)",
            d.digest
        )));
    }
    Ok(refs)
}

/// Everything an image consists of: manifests children first (the image's own last), and
/// each blob once.
#[derive(Debug, Default)]
struct Graph {
    manifests: Vec<Node>,
    blobs: Vec<Descriptor>,
}

impl Graph {
    fn add_blobs(&mut self, blobs: Vec<Descriptor>) {
        for b in blobs {
            if !self.blobs.iter().any(|x| x.digest == b.digest) {
                self.blobs.push(b);
            }
        }
    }
}

fn walk_layout(
    layout: &LayoutReader,
    desc: &Descriptor,
    depth: usize,
    graph: &mut Graph,
) -> Result<()> {
    if graph.manifests.iter().any(|n| n.desc.digest == desc.digest) {
        return Ok(());
    }
    let bytes = layout.read_small(desc)?;
    let media_type = doc_media_type(&bytes, Some(&desc.media_type));
    let refs = refs_of(&media_type, &desc.digest, &bytes)?;
    if !refs.manifests.is_empty() && depth >= MAX_DEPTH {
        return Err(TransferError::BadManifest {
            digest: desc.digest.clone(),
            message: format!("indexes nested deeper than {MAX_DEPTH}"),
        });
    }
    for child in &refs.manifests {
        walk_layout(layout, child, depth + 1, graph)?;
    }
    graph.add_blobs(refs.blobs);
    let mut desc = desc.clone();
    desc.media_type = media_type;
    graph.manifests.push(Node { desc, bytes });
    Ok(())
}

fn on_bytes(progress: &Arc<dyn Progress>, digest: &str) -> OnBytes {
    let progress = progress.clone();
    let digest = digest.to_owned();
    Arc::new(move |n| progress.advance(&digest, n))
}

/// Pushes `image` of `layout` to `target` (by its tag, else its digest, which must then be
/// the image's): blobs the repository lacks, then the manifests.
pub async fn push(
    client: &RegistryClient,
    layout: &LayoutReader,
    image: &Descriptor,
    target: &Reference,
    progress: Arc<dyn Progress>,
) -> Result<Report> {
    if let Some(d) = &target.digest
        && *d != image.digest
    {
        return Err(TransferError::WrongDigest {
            reference: format!("the image of {}", layout.path().display()),
            expected: d.clone(),
            actual: image.digest.clone(),
        });
    }
    let mut graph = Graph::default();
    walk_layout(layout, image, 0, &mut graph)?;
    // Every blob is found (with its size right) before anything is sent.
    let ranges = graph
        .blobs
        .iter()
        .map(|b| layout.blob(b))
        .collect::<Result<Vec<_>, _>>()?;
    let moved = futures_util::stream::iter(graph.blobs.iter().zip(ranges))
        .map(|(blob, range)| {
            let progress = progress.clone();
            async move {
                let registry_err = |source| TransferError::Registry {
                    action: "push blob",
                    digest: blob.digest.clone(),
                    source,
                };
                progress.start(&blob.digest, blob.size);
                let skip = client
                    .has_blob(target, &blob.digest)
                    .await
                    .map_err(registry_err)?;
                if !skip {
                    client
                        .push_blob(
                            target,
                            &blob.digest,
                            &range,
                            &on_bytes(&progress, &blob.digest),
                        )
                        .await
                        .map_err(registry_err)?;
                }
                progress.done(&blob.digest, skip);
                Ok::<_, TransferError>((!skip).then_some(blob.size))
            }
        })
        .buffer_unordered(PARALLEL)
        .try_collect::<Vec<_>>()
        .await?;

    let (top, children) = graph
        .manifests
        .split_last()
        .expect("the walk adds the image itself");
    for m in children {
        put_manifest(client, target, &m.desc.digest, m).await?;
    }
    let reference = target.tag.as_deref().unwrap_or(&top.desc.digest);
    put_manifest(client, target, reference, top).await?;
    Ok(Report {
        repository: target.repository.clone(),
        tag: target.tag.clone(),
        digest: top.desc.digest.clone(),
        media_type: top.desc.media_type.clone(),
        manifests: graph.manifests.len(),
        blobs: moved.len(),
        skipped: moved.iter().filter(|m| m.is_none()).count(),
        bytes: moved.iter().flatten().sum(),
    })
}

async fn put_manifest(
    client: &RegistryClient,
    target: &Reference,
    reference: &str,
    m: &Node,
) -> Result<()> {
    let stored = client
        .put_manifest(target, reference, &m.desc.media_type, &m.bytes)
        .await
        .map_err(|source| TransferError::Registry {
            action: "push manifest",
            digest: m.desc.digest.clone(),
            source,
        })?;
    if stored != m.desc.digest {
        return Err(TransferError::WrongDigest {
            reference: format!("the manifest the registry stored for {}", m.desc.digest),
            expected: m.desc.digest.clone(),
            actual: stored,
        });
    }
    Ok(())
}

/// Pulls `source` (every platform of an index) into the layout at `dest`: blobs it lacks,
/// verified, then the manifests, then the image in `index.json` named by the reference's
/// tag. `dest` is made (or opened) only once the image's manifests are fetched, so an image
/// that cannot be found leaves nothing behind.
pub async fn pull(
    client: &RegistryClient,
    source: &Reference,
    dest: &Path,
    progress: Arc<dyn Progress>,
) -> Result<Report> {
    let graph = walk_registry(client, source).await?;
    let dest = &LayoutWriter::create(dest)?;
    let moved = futures_util::stream::iter(&graph.blobs)
        .map(|blob| {
            let progress = progress.clone();
            async move {
                progress.start(&blob.digest, blob.size);
                let skip = dest.has_blob(blob);
                if !skip {
                    download(
                        client,
                        source,
                        dest,
                        blob,
                        &on_bytes(&progress, &blob.digest),
                    )
                    .await?;
                }
                progress.done(&blob.digest, skip);
                Ok::<_, TransferError>((!skip).then_some(blob.size))
            }
        })
        .buffer_unordered(PARALLEL)
        .try_collect::<Vec<_>>()
        .await?;
    for m in &graph.manifests {
        if !dest.has_blob(&m.desc) {
            dest.write_blob(&m.desc.digest, &m.bytes)?;
        }
    }
    let top = graph
        .manifests
        .last()
        .expect("the walk adds the image itself");
    let mut image = Descriptor::new(&top.desc.media_type, &top.desc.digest, top.desc.size);
    if let Some(tag) = &source.tag {
        image.annotations.insert(REF_NAME.into(), tag.clone());
    }
    dest.add_image(image)?;
    Ok(Report {
        repository: source.repository.clone(),
        tag: source.tag.clone(),
        digest: top.desc.digest.clone(),
        media_type: top.desc.media_type.clone(),
        manifests: graph.manifests.len(),
        blobs: moved.len(),
        skipped: moved.iter().filter(|m| m.is_none()).count(),
        bytes: moved.iter().flatten().sum(),
    })
}

/// Fetches the image's manifests (verified) and lists its blobs; the image's own manifest
/// comes last.
async fn walk_registry(client: &RegistryClient, source: &Reference) -> Result<Graph> {
    let fetch_err = |reference: &str| {
        let reference = reference.to_owned();
        move |source| TransferError::Fetch { reference, source }
    };
    let top = client
        .manifest(source, source.manifest_ref())
        .await
        .map_err(fetch_err(&source.to_string()))?;
    let media_type = doc_media_type(&top.bytes, top.content_type.as_deref());
    let top = Node {
        desc: Descriptor::new(&media_type, &top.digest, top.bytes.len() as u64),
        bytes: top.bytes,
    };
    // Breadth first, one level at a time; reversed at the end so children come first.
    let mut graph = Graph::default();
    let mut seen = HashSet::from([top.desc.digest.clone()]);
    let mut level = vec![top];
    for depth in 0.. {
        if level.is_empty() {
            break;
        }
        let mut next = Vec::new();
        for node in level {
            let refs = refs_of(&node.desc.media_type, &node.desc.digest, &node.bytes)?;
            if !refs.manifests.is_empty() && depth >= MAX_DEPTH {
                return Err(TransferError::BadManifest {
                    digest: node.desc.digest.clone(),
                    message: format!("indexes nested deeper than {MAX_DEPTH}"),
                });
            }
            for child in refs.manifests {
                if !seen.insert(child.digest.clone()) {
                    continue;
                }
                let got = client
                    .manifest(source, &child.digest)
                    .await
                    .map_err(fetch_err(&format!(
                        "{}@{}",
                        source.repository, child.digest
                    )))?;
                if got.bytes.len() as u64 != child.size {
                    return Err(TransferError::BadManifest {
                        digest: child.digest.clone(),
                        message: format!(
                            "{} bytes, its index says {}",
                            got.bytes.len(),
                            child.size
                        ),
                    });
                }
                let hint = got.content_type.as_deref().or(Some(&child.media_type));
                let media_type = doc_media_type(&got.bytes, hint);
                next.push(Node {
                    desc: Descriptor::new(&media_type, &child.digest, child.size),
                    bytes: got.bytes,
                });
            }
            graph.add_blobs(refs.blobs);
            graph.manifests.push(node);
        }
        level = next;
    }
    graph.manifests.reverse();
    Ok(graph)
}

/// Downloads a blob into a temporary file of `dest`, verified while it streams, and
/// publishes it; on any failure the temporary file is removed.
async fn download(
    client: &RegistryClient,
    source: &Reference,
    dest: &LayoutWriter,
    blob: &Descriptor,
    on_bytes: &OnBytes,
) -> Result<()> {
    let temp = dest.temp_path(&blob.digest);
    let io_err = |e: std::io::Error| {
        TransferError::Layout(LayoutError::Io {
            path: temp.display().to_string(),
            source: e,
        })
    };
    let result = async {
        let mut file = tokio::fs::File::create(&temp).await.map_err(io_err)?;
        client
            .blob_to_writer(source, &blob.digest, blob.size, &mut file, on_bytes)
            .await
            .map_err(|source| TransferError::Registry {
                action: "pull blob",
                digest: blob.digest.clone(),
                source,
            })?;
        file.sync_all().await.map_err(io_err)?;
        drop(file);
        dest.publish(&temp, &blob.digest)?;
        Ok(())
    }
    .await;
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    #[test]
    fn refs_of_manifests_and_indexes() {
        let m = serde_json::json!({
            "schemaVersion": 2,
            "config": {"mediaType": "c", "digest": d('a'), "size": 1},
            "layers": [{"mediaType": "l", "digest": d('b'), "size": 2}],
        });
        let refs = refs_of(MANIFEST_TYPES[0], &d('0'), m.to_string().as_bytes()).unwrap();
        assert_eq!(
            refs.blobs
                .iter()
                .map(|b| b.digest.as_str())
                .collect::<Vec<_>>(),
            [d('a'), d('b')]
        );
        assert!(refs.manifests.is_empty());
        // Docker's schema 2 has the same shape.
        refs_of(MANIFEST_TYPES[1], &d('0'), m.to_string().as_bytes()).unwrap();

        let i = serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{"mediaType": MANIFEST_TYPES[0], "digest": d('c'), "size": 3,
                           "platform": {"os": "linux", "architecture": "arm64"}}],
        });
        let refs = refs_of(INDEX_TYPES[0], &d('0'), i.to_string().as_bytes()).unwrap();
        assert_eq!(refs.manifests[0].digest, d('c'));
        assert_eq!(refs.manifests[0].other["platform"]["architecture"], "arm64");

        let bad = serde_json::json!({
            "schemaVersion": 2,
            "config": {"mediaType": "c", "digest": "sha256:../../x", "size": 1},
        });
        let e = refs_of(MANIFEST_TYPES[0], &d('0'), bad.to_string().as_bytes()).unwrap_err();
        assert!(e.to_string().contains("unsupported digest"), "{e}");
        let e = refs_of("application/x-unknown", &d('0'), b"{}").unwrap_err();
        assert!(e.to_string().contains("unsupported media type"), "{e}");
        let e = refs_of(MANIFEST_TYPES[0], &d('0'), b"{}").unwrap_err();
        assert!(e.to_string().contains("without config"), "{e}");
    }
}
