//! Image verbs against the server's own registry (`/v2/` on the API's port, with the CLI's
//! token): `hive push` and `hive pull` between an OCI layout (or an archive of one) and a
//! repository, and `hive image ls|rm|public|private|gc` on the tenant's repositories through
//! the API. The copying is `hive_agent::image::transfer`'s; this file resolves names, draws
//! progress bars and prints the outcome.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use hive_agent::image::Reference;
use hive_agent::image::layout::{self, LayoutReader};
use hive_agent::image::registry::RegistryClient;
use hive_agent::image::transfer::{self, Progress, Quiet, Report};
use indicatif::{HumanBytes, MultiProgress, ProgressBar, ProgressStyle};

use super::output::human_bytes;
use super::{Ctx, Output};

#[derive(Debug, Subcommand)]
pub enum ImageCmd {
    /// List the tenant's repositories: tags, size, visibility, and the tenant's usage.
    Ls,
    /// Delete a tag (REPO:TAG), a manifest and its tags (REPO@DIGEST), or a whole repository
    /// (REPO). The content goes with the next garbage collection.
    Rm {
        /// `busybox:1`, `busybox@sha256:…` or `busybox` (in the current tenant), or with the
        /// tenant: `acme/busybox:1`.
        image: String,
    },
    /// Let anyone pull a repository, without credentials.
    Public { repository: String },
    /// Let only the tenant pull a repository (the default).
    Private { repository: String },
    /// Collect the registry's garbage now (platform admin).
    Gc {
        /// Links younger than this are pushes in flight and kept, e.g. 0s, 10m, 1h.
        #[arg(long, default_value = "1h", value_parser = super::resources::parse_duration_or_zero)]
        grace: u64,
    },
}

pub async fn image(ctx: &Ctx, cmd: ImageCmd) -> Result<()> {
    match cmd {
        ImageCmd::Ls => {
            let tenant = ctx.tenant().await?;
            let list = ctx.client.list_images(&tenant).await?;
            if ctx.output != Output::Table {
                return ctx.output.object(&list, &[], |_| Vec::new());
            }
            ctx.output.list(
                &list.items,
                &["REPOSITORY", "TAGS", "MANIFESTS", "SIZE", "PUBLIC"],
                |r| {
                    let tags: Vec<&str> = r.tags.iter().map(|t| t.tag.as_str()).collect();
                    vec![
                        r.name.clone(),
                        if tags.is_empty() {
                            "-".into()
                        } else {
                            tags.join(",")
                        },
                        r.manifests.to_string(),
                        human_bytes(r.size_bytes),
                        if r.public { "yes" } else { "no" }.into(),
                    ]
                },
            )?;
            let quota = list.quota_bytes.map_or_else(
                || "no quota".to_owned(),
                |q| format!("quota {}", human_bytes(q)),
            );
            println!(
                "tenant {tenant} uses {} ({quota})",
                human_bytes(list.usage_bytes)
            );
            Ok(())
        }
        ImageCmd::Rm { image } => {
            let (tenant, name, reference) = split_image(&image, &ctx.tenant().await?)?;
            match reference {
                None => {
                    ctx.client.delete_image(&tenant, &name).await?;
                    println!("repository {tenant}/{name} deleted");
                }
                Some(r) => {
                    let (client, target) = registry(ctx, &format!("{tenant}/{name}")).await?;
                    client
                        .delete_manifest(&target, &r)
                        .await
                        .with_context(|| format!("delete {tenant}/{name}:{r}"))?;
                    println!(
                        "{tenant}/{name}{}{r} deleted",
                        if r.contains(':') { "@" } else { ":" }
                    );
                }
            }
            Ok(())
        }
        ImageCmd::Public { repository } => visibility(ctx, &repository, true).await,
        ImageCmd::Private { repository } => visibility(ctx, &repository, false).await,
        ImageCmd::Gc { grace } => {
            let r = ctx.client.registry_gc(grace).await?;
            if ctx.output != Output::Table {
                return ctx.output.object(&r, &[], |_| Vec::new());
            }
            println!(
                "registry garbage collected: {} layer links unlinked, {} blobs deleted ({}), {} kept",
                r.unlinked,
                r.deleted,
                human_bytes(r.freed_bytes),
                r.kept
            );
            Ok(())
        }
    }
}

async fn visibility(ctx: &Ctx, repository: &str, public: bool) -> Result<()> {
    let (tenant, name, reference) = split_image(repository, &ctx.tenant().await?)?;
    if reference.is_some() {
        bail!("{repository}: visibility is per repository, give it without a tag or digest");
    }
    let r = ctx.client.set_image_public(&tenant, &name, public).await?;
    let shown = if r.public { "public" } else { "private" };
    println!("repository {} is {shown}", r.name);
    Ok(())
}

/// `[tenant/]name[:tag|@digest]` → (tenant, name within it, tag or digest).
fn split_image(s: &str, current: &str) -> Result<(String, String, Option<String>)> {
    let (repo, reference) = match s.split_once('@') {
        Some((r, d)) => (r, Some(d.to_owned())),
        None => match s.rsplit_once(':') {
            Some((r, t)) if !t.contains('/') => (r, Some(t.to_owned())),
            _ => (s, None),
        },
    };
    if repo.is_empty() || reference.as_deref() == Some("") {
        bail!("{s:?}: expected REPO, REPO:TAG or REPO@DIGEST");
    }
    Ok(match repo.split_once('/') {
        Some((t, name)) if !name.is_empty() => (t.to_owned(), name.to_owned(), reference),
        Some(_) => bail!("{s:?}: expected REPO, REPO:TAG or REPO@DIGEST"),
        None => (current.to_owned(), repo.to_owned(), reference),
    })
}

#[derive(Debug, Args)]
pub struct PushArgs {
    /// An OCI image layout directory, or a tar (or tar.gz) archive of one; `PATH:NAME` picks
    /// the image named NAME (org.opencontainers.image.ref.name) when index.json has several.
    pub source: String,
    /// REPO[:TAG]: `busybox:1` is in the current tenant, `acme/busybox:1` names the tenant
    /// (TAG: latest).
    pub target: String,
}

#[derive(Debug, Args)]
pub struct PullArgs {
    /// REPO[:TAG|@DIGEST]: `busybox:1` is in the current tenant (TAG: latest).
    pub source: String,
    /// The OCI image layout directory to write: made if missing, else added to (the image
    /// is listed in index.json under its tag).
    pub dest: PathBuf,
}

pub async fn push(ctx: &Ctx, args: PushArgs) -> Result<()> {
    let (path, name) = layout::split_source(&args.source);
    let (client, target) = registry(ctx, &args.target).await?;
    if target.digest.is_some() && target.tag.is_none() {
        bail!(
            "push to {}: give a tag (REPO:TAG), not a digest",
            args.target
        );
    }
    // Decompressing a tar.gz takes a while: off the async threads.
    let layout = tokio::task::spawn_blocking(move || LayoutReader::open(&path)).await??;
    let image = layout.select(name.as_deref())?;
    let (progress, bars) = progress();
    let report = transfer::push(&client, &layout, &image, &target, progress)
        .await
        .with_context(|| format!("push {} to {}", args.source, shown(&target)));
    bars.clear();
    let report = report?;
    print(ctx.output, "pushed", &report, None)
}

pub async fn pull(ctx: &Ctx, args: PullArgs) -> Result<()> {
    let (client, source) = registry(ctx, &args.source).await?;
    let (progress, bars) = progress();
    let report = transfer::pull(&client, &source, &args.dest, progress)
        .await
        .with_context(|| format!("pull {} into {}", shown(&source), args.dest.display()));
    bars.clear();
    let report = report?;
    print(
        ctx.output,
        "pulled",
        &report,
        Some(&format!(" into {}", args.dest.display())),
    )
}

/// A client of the server's registry with the CLI's token, and `repo` as a reference in it
/// (a name without a `/` is in the current tenant).
async fn registry(ctx: &Ctx, repo: &str) -> Result<(RegistryClient, Reference)> {
    let base = ctx.client.base();
    let (scheme, rest) = base
        .split_once("://")
        .with_context(|| format!("server URL {base} has no scheme"))?;
    let host = rest.split('/').next().unwrap_or(rest);
    let name_end = repo.find([':', '@']).unwrap_or(repo.len());
    let full = if repo[..name_end].contains('/') {
        repo.to_owned()
    } else {
        format!("{}/{repo}", ctx.tenant().await?)
    };
    let reference = Reference::parse_repository(host, &full)?;
    let insecure = if scheme == "http" {
        vec![host.to_owned()]
    } else {
        Vec::new()
    };
    let mut client = RegistryClient::new(insecure, HashMap::new())?;
    if let Some(token) = ctx.client.token() {
        client = client.with_token(host, token);
    }
    Ok((client, reference))
}

/// `repo:tag` or `repo@digest`, without the host (which is always the server's).
fn shown(r: &Reference) -> String {
    let mut s = r.repository.clone();
    if let Some(t) = &r.tag {
        s = format!("{s}:{t}");
    }
    if let Some(d) = &r.digest {
        s = format!("{s}@{d}");
    }
    s
}

fn print(output: Output, verb: &str, r: &Report, suffix: Option<&str>) -> Result<()> {
    match output {
        Output::Table => {
            println!("{}", summary(verb, r, suffix.unwrap_or("")));
            Ok(())
        }
        _ => output.object(r, &[], |_| Vec::new()),
    }
}

/// `pushed acme/busybox:1 sha256:… (3 blobs, 2 skipped, 1.2 MiB)`.
fn summary(verb: &str, r: &Report, suffix: &str) -> String {
    let name = match &r.tag {
        Some(t) => format!("{}:{t}", r.repository),
        None => r.repository.clone(),
    };
    let manifests = if r.manifests > 1 {
        format!("{} manifests, ", r.manifests)
    } else {
        String::new()
    };
    format!(
        "{verb} {name} {}{suffix} ({manifests}{} blob{}, {} skipped, {})",
        r.digest,
        r.blobs,
        if r.blobs == 1 { "" } else { "s" },
        r.skipped,
        HumanBytes(r.bytes)
    )
}

/// Progress bars on stderr when it is a terminal, else nothing.
fn progress() -> (Arc<dyn Progress>, Arc<Bars>) {
    let bars = Arc::new(Bars {
        multi: MultiProgress::new(),
        bars: Mutex::new(HashMap::new()),
    });
    if std::io::stderr().is_terminal() {
        (bars.clone(), bars)
    } else {
        (Arc::new(Quiet), bars)
    }
}

/// One bar per blob: bytes moved, then `done` or `exists`.
struct Bars {
    multi: MultiProgress,
    bars: Mutex<HashMap<String, ProgressBar>>,
}

impl Bars {
    fn bar(&self, digest: &str) -> Option<ProgressBar> {
        self.bars.lock().ok()?.get(digest).cloned()
    }

    /// Removes the bars (the summary line replaces them).
    fn clear(&self) {
        let _ = self.multi.clear();
    }
}

impl Progress for Bars {
    fn start(&self, digest: &str, size: u64) {
        let style = ProgressStyle::with_template(
            "{prefix} [{bar:30}] {binary_bytes:>10} / {binary_total_bytes:<10} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        let bar = self.multi.add(ProgressBar::new(size).with_style(style));
        bar.set_prefix(digest.get(7..19).unwrap_or(digest).to_owned());
        if let Ok(mut bars) = self.bars.lock() {
            bars.insert(digest.to_owned(), bar);
        }
    }

    fn advance(&self, digest: &str, bytes: u64) {
        if let Some(bar) = self.bar(digest) {
            bar.inc(bytes);
        }
    }

    fn done(&self, digest: &str, skipped: bool) {
        if let Some(bar) = self.bar(digest) {
            if skipped {
                bar.set_position(bar.length().unwrap_or(0));
            }
            bar.finish_with_message(if skipped { "exists" } else { "done" });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_names_split_into_tenant_name_and_reference() {
        let s = |x: &str| split_image(x, "cur").unwrap();
        assert_eq!(s("bb"), ("cur".into(), "bb".into(), None));
        assert_eq!(s("bb:1"), ("cur".into(), "bb".into(), Some("1".into())));
        assert_eq!(
            s("acme/tools/bb@sha256:ab"),
            ("acme".into(), "tools/bb".into(), Some("sha256:ab".into()))
        );
        assert_eq!(
            s("acme/bb:v2"),
            ("acme".into(), "bb".into(), Some("v2".into()))
        );
        for bad in ["", ":1", "bb:", "acme/", "bb@"] {
            assert!(split_image(bad, "cur").is_err(), "{bad:?}");
        }
    }

    #[test]
    fn summary_line() {
        let mut r = Report {
            repository: "acme/busybox".into(),
            tag: Some("1".into()),
            digest: "sha256:abc".into(),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            manifests: 1,
            blobs: 3,
            skipped: 2,
            bytes: 1_258_291,
        };
        assert_eq!(
            summary("pushed", &r, ""),
            "pushed acme/busybox:1 sha256:abc (3 blobs, 2 skipped, 1.20 MiB)"
        );
        r.manifests = 3;
        r.blobs = 1;
        r.tag = None;
        assert_eq!(
            summary("pulled", &r, " into /tmp/x"),
            "pulled acme/busybox sha256:abc into /tmp/x (3 manifests, 1 blob, 2 skipped, 1.20 MiB)"
        );
    }
}
