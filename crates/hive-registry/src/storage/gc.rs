//! Garbage collection: mark and sweep, safe while pushes run, in this process or in any
//! other serving the same root.
//!
//! 1. **Unreferenced layers.** In each repository, layer links that none of its manifests
//!    refers to are unlinked once older than the grace period: a push uploads its layers
//!    before its manifest, so a young link is a push in flight, not garbage. Held under the
//!    exclusive lock per repository, so no manifest is being checked against those links.
//! 2. **Mark**, without a lock: every blob any repository links (layer or manifest); the
//!    blobs not among them are the candidates.
//! 3. **Sweep**, under the exclusive lock: the links are read again (no link can be in the
//!    making then: every request that makes a blob reachable holds the lock shared from its
//!    check that the blob exists until its link is written), and candidates still unlinked
//!    are deleted. Pushes wait for that second reading only when there is garbage.
//!
//! Manifests are never collected (an untagged manifest is still pullable by digest); they
//! go when deleted, and their blobs with the next collection.

use std::time::{Duration, SystemTime};

use super::{Storage, linked_set, list_dir, not_found};
use crate::error::Result;
use crate::names::Repo;

/// What one collection did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Layer links removed because no manifest of their repository used them.
    pub unlinked: usize,
    /// Blobs deleted.
    pub deleted: usize,
    /// Their bytes.
    pub freed_bytes: u64,
    /// Blobs kept.
    pub kept: usize,
}

fn older_than(modified: std::io::Result<SystemTime>, grace: Duration) -> bool {
    modified
        .ok()
        .and_then(|m| SystemTime::now().duration_since(m).ok())
        .is_some_and(|age| age >= grace)
}

impl Storage {
    /// Runs one collection; `grace` protects links and temporary files younger than it.
    pub async fn gc(&self, grace: Duration) -> Result<GcReport> {
        let mut report = GcReport::default();
        for name in self.catalog(None).await {
            let Ok(r) = Repo::parse(&name) else { continue };
            report.unlinked += self.unlink_unreferenced(&r, grace).await?;
        }

        let marked = linked_set(&self.root).await;
        let blobs = self.root.join("blobs/sha256");
        let all = list_dir(&blobs).await;
        let candidates: Vec<String> = all
            .iter()
            .filter(|h| !marked.contains(*h))
            .cloned()
            .collect();
        report.kept = all.len() - candidates.len();
        if !candidates.is_empty() {
            let _x = self.gc_exclusive().await?;
            let linked = linked_set(&self.root).await;
            for hex in candidates {
                if linked.contains(&hex) {
                    report.kept += 1;
                    continue;
                }
                let path = blobs.join(&hex);
                let size = tokio::fs::metadata(&path)
                    .await
                    .map(|m| m.len())
                    .unwrap_or(0);
                match tokio::fs::remove_file(&path).await {
                    Ok(()) => {
                        report.deleted += 1;
                        report.freed_bytes += size;
                    }
                    Err(e) if not_found(&e) => {}
                    Err(e) => tracing::warn!(blob = %hex, error = %e, "registry gc: delete"),
                }
            }
        }

        // Temporary files of writes that never finished (a crash between write and rename).
        let tmp = self.root.join("tmp");
        for name in list_dir(&tmp).await {
            let p = tmp.join(name);
            if older_than(
                tokio::fs::metadata(&p).await.and_then(|m| m.modified()),
                grace,
            ) {
                let _ = tokio::fs::remove_file(&p).await;
            }
        }
        Ok(report)
    }

    /// Unlinks the layers of `r` that none of its manifests refers to and that were linked
    /// longer than `grace` ago.
    async fn unlink_unreferenced(&self, r: &Repo, grace: Duration) -> Result<usize> {
        let x = self.gc_exclusive().await?;
        let referenced = self.references(r).await?;
        let dir = self.repo_dir(r).join("_layers");
        let mut n = 0;
        for hex in list_dir(&dir).await {
            if referenced.contains_key(&hex) {
                continue;
            }
            let link = dir.join(&hex);
            if !older_than(
                tokio::fs::metadata(&link).await.and_then(|m| m.modified()),
                grace,
            ) {
                continue;
            }
            match tokio::fs::remove_file(&link).await {
                Ok(()) => n += 1,
                Err(e) if not_found(&e) => {}
                Err(e) => tracing::warn!(repo = %r, blob = %hex, error = %e, "registry gc: unlink"),
            }
        }
        drop(x);
        if n > 0 {
            self.usage_guard(r.tenant()).await?.forget();
        }
        Ok(n)
    }
}
