//! End to end: `hive push` and `hive pull` against the registry of a real `hive up` (in a
//! network namespace of its own), with a busybox image built by umoci: round trips that are
//! byte for byte, archives, skopeo reading what `hive push` wrote, a multi-platform index,
//! skipped blobs, and the errors (another tenant's repository, a missing layout, a corrupt
//! layout, a registry blob that does not match its digest).
//! Needs root, iproute2, umoci, skopeo and busybox-static (`scripts/deps.sh`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use sha2::Digest;

mod common;

use common::{Cleanup, Netns, Up, admin_token, busybox_layout, fails, hive, ok, run, start_up_in};

/// `hive up` with tenant `acme` and a CLI logged in as its member (`user`).
struct Setup {
    // Dropped in this order: the server, the leftovers, the directory, the namespace.
    _up: Up,
    _cleanup: Cleanup,
    dir: tempfile::TempDir,
    ns: std::sync::Arc<Netns>,
    data: PathBuf,
    user: PathBuf,
    user_token: String,
    host: String,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let admin = dir.path().join("admin.json");
    let user = dir.path().join("user.json");
    let cleanup = Cleanup::of(&data);
    let ns = Netns::new();
    let up = start_up_in(&ns, &data, &admin);
    let host = up.url.trim_start_matches("http://").to_owned();
    for t in ["acme", "other"] {
        ok(&admin, &["tenant", "create", t]);
    }
    let user_token = ok(
        &admin,
        &[
            "--tenant", "acme", "token", "create", "--name", "ci", "--role", "member",
        ],
    )
    .trim()
    .to_owned();
    ok(
        &user,
        &["login", "--server", &up.url, "--token", &user_token],
    );
    Setup {
        _up: up,
        _cleanup: cleanup,
        dir,
        ns,
        data,
        user,
        user_token,
        host,
    }
}

/// The `(digest, blobs, skipped)` of a summary line
/// `pushed acme/x:1 sha256:… (N blobs, M skipped, …)`.
fn summary(line: &str, verb: &str) -> (String, usize, usize) {
    let line = line.trim();
    assert!(line.starts_with(verb), "{line}");
    let digest = line
        .split_whitespace()
        .find(|w| w.starts_with("sha256:"))
        .unwrap_or_else(|| panic!("no digest in {line:?}"))
        .to_owned();
    let inside = line.rsplit_once('(').unwrap().1;
    let number_before = |word: &str| -> usize {
        let words: Vec<&str> = inside.split([' ', ',']).filter(|w| !w.is_empty()).collect();
        let i = words
            .iter()
            .position(|w| w.starts_with(word))
            .unwrap_or_else(|| panic!("no {word} in {line:?}"));
        words[i - 1].parse().unwrap()
    };
    (digest, number_before("blob"), number_before("skipped"))
}

fn read_json(p: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

/// The descriptor named `name` in a layout's index.json.
fn named(layout: &Path, name: &str) -> Value {
    read_json(&layout.join("index.json"))["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["annotations"]["org.opencontainers.image.ref.name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no {name} in {}", layout.display()))
}

fn blob_path(layout: &Path, digest: &str) -> PathBuf {
    layout
        .join("blobs/sha256")
        .join(digest.strip_prefix("sha256:").unwrap())
}

fn blob_names(layout: &Path) -> BTreeSet<String> {
    std::fs::read_dir(layout.join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect()
}

/// The digests an image consists of: its manifest (or index), and recursively every
/// manifest, config and layer.
fn closure(layout: &Path, digest: &str, out: &mut BTreeSet<String>) {
    out.insert(digest.to_owned());
    let doc = read_json(&blob_path(layout, digest));
    for m in doc["manifests"].as_array().into_iter().flatten() {
        closure(layout, m["digest"].as_str().unwrap(), out);
    }
    for b in std::iter::once(&doc["config"]).chain(doc["layers"].as_array().into_iter().flatten()) {
        if let Some(d) = b["digest"].as_str() {
            out.insert(d.to_owned());
        }
    }
}

/// Every blob of the image `digest` is in `to`, byte for byte as in `from`; `to` has no
/// other blob and no leftover of a download.
fn same_image(from: &Path, to: &Path, digest: &str) {
    let mut digests = BTreeSet::new();
    closure(from, digest, &mut digests);
    for d in &digests {
        assert_eq!(
            std::fs::read(blob_path(from, d)).unwrap(),
            std::fs::read(blob_path(to, d)).unwrap(),
            "blob {d}"
        );
    }
    let hex: BTreeSet<String> = digests.iter().map(|d| d[7..].to_owned()).collect();
    assert_eq!(blob_names(to), hex);
    no_leftovers(to);
}

fn no_leftovers(layout: &Path) {
    for e in std::fs::read_dir(layout).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        assert!(
            !name.starts_with(".hive-tmp"),
            "{name} left in {}",
            layout.display()
        );
    }
}

#[test]
fn push_and_pull_round_trip_skip_archives_and_interoperate_with_skopeo() {
    let s = setup();
    let dir = s.dir.path();
    let layout = busybox_layout(dir);
    let built = named(&layout, "test");
    let built_digest = built["digest"].as_str().unwrap();

    // A layout with one image needs no name; the repository is in the CLI's tenant.
    let out = ok(&s.user, &["push", layout.to_str().unwrap(), "busybox:1"]);
    let (digest, blobs, skipped) = summary(&out, "pushed acme/busybox:1 ");
    assert_eq!((digest.as_str(), blobs, skipped), (built_digest, 2, 0));

    let pulled = dir.join("pulled");
    let out = ok(
        &s.user,
        &["pull", "acme/busybox:1", pulled.to_str().unwrap()],
    );
    let (digest, blobs, skipped) = summary(&out, "pulled acme/busybox:1 ");
    assert_eq!((digest.as_str(), blobs, skipped), (built_digest, 2, 0));
    assert_eq!(
        read_json(&pulled.join("oci-layout")),
        json!({"imageLayoutVersion": "1.0.0"})
    );
    let entry = named(&pulled, "1");
    assert_eq!(entry["digest"], built_digest);
    assert_eq!(entry["size"], built["size"]);
    assert_eq!(
        entry["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    same_image(&layout, &pulled, built_digest);

    // Again: every blob is skipped both ways; the layout names the image once.
    let out = ok(
        &s.user,
        &["push", &format!("{}:test", layout.display()), "busybox:1"],
    );
    let (_, blobs, skipped) = summary(&out, "pushed acme/busybox:1 ");
    assert_eq!((blobs, skipped), (2, 2));
    assert!(out.contains("skipped, 0 B)"), "{out}");
    let out = ok(&s.user, &["pull", "busybox:1", pulled.to_str().unwrap()]);
    assert_eq!(summary(&out, "pulled").2, 2);
    let index = read_json(&pulled.join("index.json"));
    assert_eq!(index["manifests"].as_array().unwrap().len(), 1);
    // By digest: listed unnamed beside the tag, with the same content.
    let out = ok(
        &s.user,
        &[
            "pull",
            &format!("busybox@{built_digest}"),
            pulled.to_str().unwrap(),
        ],
    );
    assert_eq!(summary(&out, "pulled acme/busybox ").0, built_digest);
    let index = read_json(&pulled.join("index.json"));
    assert_eq!(index["manifests"].as_array().unwrap().len(), 2);
    same_image(&layout, &pulled, built_digest);

    // JSON output.
    let report: Value = serde_json::from_str(&ok(
        &s.user,
        &["push", layout.to_str().unwrap(), "busybox:1", "-o", "json"],
    ))
    .unwrap();
    assert_eq!(report["digest"], built_digest);
    assert_eq!(
        (report["blobs"].as_u64(), report["skipped"].as_u64()),
        (Some(2), Some(2))
    );

    // Archives: a plain tar (read in place) and a tar.gz, of the layout, to new repositories.
    let tar = dir.join("image.tar");
    let tgz = dir.join("image.tar.gz");
    run(
        "tar",
        &[
            "-C",
            layout.to_str().unwrap(),
            "-cf",
            tar.to_str().unwrap(),
            ".",
        ],
    );
    run(
        "tar",
        &[
            "-C",
            dir.to_str().unwrap(),
            "-czf",
            tgz.to_str().unwrap(),
            "oci",
        ],
    );
    for (archive, repo) in [(&tar, "acme/from-tar:1"), (&tgz, "acme/from-tgz:1")] {
        let out = ok(
            &s.user,
            &["push", &format!("{}:test", archive.display()), repo],
        );
        let (digest, blobs, skipped) = summary(&out, &format!("pushed {repo} "));
        assert_eq!((digest.as_str(), blobs, skipped), (built_digest, 2, 0));
        let to = dir.join(repo.replace(['/', ':'], "-"));
        ok(&s.user, &["pull", repo, to.to_str().unwrap()]);
        same_image(&layout, &to, built_digest);
    }

    // skopeo reads what `hive push` wrote: same manifest digest, same blobs.
    let by_skopeo = dir.join("skopeo");
    common::run_in(
        &s.ns,
        "skopeo",
        &[
            "copy",
            "--src-tls-verify=false",
            "--src-creds",
            &format!("x:{}", s.user_token),
            &format!("docker://{}/acme/busybox:1", s.host),
            &format!("oci:{}:1", by_skopeo.display()),
        ],
    );
    assert_eq!(named(&by_skopeo, "1")["digest"], built_digest);
    let mut digests = BTreeSet::new();
    closure(&by_skopeo, built_digest, &mut digests);
    for d in &digests {
        assert_eq!(
            std::fs::read(blob_path(&layout, d)).unwrap(),
            std::fs::read(blob_path(&by_skopeo, d)).unwrap(),
            "blob {d}"
        );
    }

    // Errors. Another tenant's repository is unknown to this tenant.
    fails(
        &s.user,
        &["push", layout.to_str().unwrap(), "other/busybox:1"],
        "NAME_UNKNOWN",
    );
    let nowhere = dir.join("no-such-layout");
    fails(
        &s.user,
        &["push", nowhere.to_str().unwrap(), "busybox:1"],
        &format!(
            "open image layout {}: No such file or directory",
            nowhere.display()
        ),
    );
    fails(
        &s.user,
        &["push", &format!("{}:nope", layout.display()), "busybox:1"],
        "index.json has no image named \"nope\" (it has: test)",
    );
    fails(
        &s.user,
        &["push", layout.to_str().unwrap(), "Acme/Busybox"],
        "invalid image reference",
    );
    fails(
        &s.user,
        &["push", dir.to_str().unwrap(), "busybox:1"],
        "not an OCI image layout: no oci-layout file",
    );
    // A tag that is not there: nothing is made at the destination.
    let fresh = dir.join("fresh");
    fails(
        &s.user,
        &["pull", "busybox:nope", fresh.to_str().unwrap()],
        "MANIFEST_UNKNOWN",
    );
    assert!(!fresh.exists());
    fails(
        &s.user,
        &["pull", "other/busybox:1", fresh.to_str().unwrap()],
        "NAME_UNKNOWN",
    );
    assert!(!fresh.exists());

    // A layout whose layer does not match its digest: refused while it streams, and the
    // repository does not get it.
    let layer = read_json(&blob_path(&layout, built_digest))["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_owned();
    let corrupt = dir.join("corrupt");
    run(
        "cp",
        &["-a", layout.to_str().unwrap(), corrupt.to_str().unwrap()],
    );
    let mut bytes = std::fs::read(blob_path(&corrupt, &layer)).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(blob_path(&corrupt, &layer), &bytes).unwrap();
    fails(
        &s.user,
        &["push", corrupt.to_str().unwrap(), "corrupt:1"],
        &format!("digest mismatch: expected {layer}"),
    );
    let head = hive(
        &s.user,
        &["pull", "corrupt:1", dir.join("c").to_str().unwrap()],
    );
    assert!(!head.status.success());

    // The registry's copy of the layer goes bad on disk: the pull fails on the digest and
    // leaves no blob of it, and no index entry.
    let stored = s
        .data
        .join("registry/blobs/sha256")
        .join(layer.strip_prefix("sha256:").unwrap());
    std::fs::write(&stored, &bytes).unwrap();
    let target = dir.join("after-corruption");
    let out = hive(&s.user, &["pull", "busybox:1", target.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("pull blob {layer}")) && err.contains("digest mismatch"),
        "{err}"
    );
    assert!(!blob_path(&target, &layer).exists());
    assert!(!target.join("index.json").exists());
    no_leftovers(&target);
}

#[test]
fn a_multi_platform_index_round_trips() {
    let s = setup();
    let dir = s.dir.path();
    let layout = busybox_layout(dir);
    let l = layout.to_str().unwrap();
    // A second image in the same layout for arm64, with a layer of its own.
    let arm = format!("{l}:arm");
    run("umoci", &["new", "--image", &arm]);
    run(
        "umoci",
        &[
            "config",
            "--image",
            &arm,
            "--architecture",
            "arm64",
            "--os",
            "linux",
        ],
    );
    let bundle = dir.join("arm-bundle");
    run(
        "umoci",
        &["unpack", "--image", &arm, bundle.to_str().unwrap()],
    );
    std::fs::write(bundle.join("rootfs/hello"), "arm64\n").unwrap();
    run(
        "umoci",
        &["repack", "--image", &arm, bundle.to_str().unwrap()],
    );

    // An index of the two, by hand, named `multi` in index.json.
    let mut index_json = read_json(&layout.join("index.json"));
    let platform = |arch: &str| json!({"architecture": arch, "os": "linux"});
    let mut amd = named(&layout, "test");
    let mut arm = named(&layout, "arm");
    for (d, arch) in [(&mut amd, "amd64"), (&mut arm, "arm64")] {
        d.as_object_mut().unwrap().remove("annotations");
        d["platform"] = platform(arch);
    }
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [amd, arm],
    }))
    .unwrap();
    let index_digest = format!("sha256:{:x}", sha2::Sha256::digest(&index));
    std::fs::write(blob_path(&layout, &index_digest), &index).unwrap();
    index_json["manifests"].as_array_mut().unwrap().push(json!({
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "digest": index_digest,
        "size": index.len(),
        "annotations": {"org.opencontainers.image.ref.name": "multi"},
    }));
    std::fs::write(layout.join("index.json"), index_json.to_string()).unwrap();

    // Three images in the layout: one must be named.
    fails(
        &s.user,
        &["push", l, "multi:1"],
        "index.json has 3 images, name one as",
    );
    let out = ok(&s.user, &["push", &format!("{l}:multi"), "multi:1"]);
    let (digest, blobs, skipped) = summary(&out, "pushed acme/multi:1 ");
    assert_eq!(
        (digest.as_str(), blobs, skipped),
        (index_digest.as_str(), 4, 0)
    );
    assert!(out.contains("(3 manifests, 4 blobs"), "{out}");

    let pulled = dir.join("pulled");
    let out = ok(&s.user, &["pull", "multi:1", pulled.to_str().unwrap()]);
    assert_eq!(summary(&out, "pulled acme/multi:1 ").0, index_digest);
    let entry = named(&pulled, "1");
    assert_eq!(entry["digest"], index_digest.as_str());
    assert_eq!(
        entry["mediaType"],
        "application/vnd.oci.image.index.v1+json"
    );
    same_image(&layout, &pulled, &index_digest);

    // Each platform's manifest can be pulled by digest too, and skopeo copies the whole
    // index (--all) with the same digest.
    let one = dir.join("one");
    ok(
        &s.user,
        &[
            "pull",
            &format!("multi@{}", arm["digest"].as_str().unwrap()),
            one.to_str().unwrap(),
        ],
    );
    same_image(&layout, &one, arm["digest"].as_str().unwrap());
    let by_skopeo = dir.join("skopeo");
    common::run_in(
        &s.ns,
        "skopeo",
        &[
            "copy",
            "--all",
            "--src-tls-verify=false",
            "--src-creds",
            &format!("x:{}", admin_token(&s.data)),
            &format!("docker://{}/acme/multi:1", s.host),
            &format!("oci:{}:1", by_skopeo.display()),
        ],
    );
    assert_eq!(named(&by_skopeo, "1")["digest"], index_digest.as_str());
}

/// `hive image`: list with tags and usage, delete a tag, make a repository public (another
/// tenant pulls it, and cannot once private again), delete the repository, collect garbage.
#[test]
fn image_ls_rm_public_private_and_gc() {
    let s = setup();
    let dir = s.dir.path();
    let layout = busybox_layout(dir);
    let layout = layout.to_str().unwrap();
    ok(&s.user, &["push", layout, "busybox:1"]);
    ok(&s.user, &["push", layout, "busybox:2"]);
    ok(&s.user, &["push", layout, "acme/tools/bb:1"]);

    let ls = |cfg: &Path| -> Value {
        serde_json::from_str(&ok(cfg, &["image", "ls", "-o", "json"])).unwrap()
    };
    let list = ls(&s.user);
    let names: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["acme/busybox", "acme/tools/bb"]);
    let tags = |l: &Value| -> Vec<String> {
        l["items"][0]["tags"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["tag"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(tags(&list), ["1", "2"]);
    let usage = list["usage_bytes"].as_u64().unwrap();
    let size = list["items"][0]["size_bytes"].as_u64().unwrap();
    assert_eq!(
        usage, size,
        "the same image in two repositories counts once"
    );
    let table = ok(&s.user, &["image", "ls"]);
    assert!(
        table.contains("acme/busybox") && table.contains("1,2"),
        "{table}"
    );
    assert!(
        table.contains("tenant acme uses") && table.contains("no quota"),
        "{table}"
    );

    // A tag goes, the manifest stays under the other tag.
    let out = ok(&s.user, &["image", "rm", "busybox:1"]);
    assert!(out.contains("acme/busybox:1 deleted"), "{out}");
    assert_eq!(tags(&ls(&s.user)), ["2"]);
    fails(&s.user, &["image", "rm", "busybox:1"], "MANIFEST_UNKNOWN");

    // Another tenant: unknown while private, pullable while public.
    let other = dir.join("other").join("cfg.json");
    std::fs::create_dir_all(other.parent().unwrap()).unwrap();
    std::fs::copy(
        dir.join("hive-test-netns"),
        other.parent().unwrap().join("hive-test-netns"),
    )
    .unwrap();
    let admin = dir.join("admin.json");
    let token = ok(
        &admin,
        &["--tenant", "other", "token", "create", "--role", "member"],
    );
    let url = format!("http://{}", s.host);
    ok(
        &other,
        &["login", "--server", &url, "--token", token.trim()],
    );
    let dest = dir.join("other-pull");
    let dest = dest.to_str().unwrap();
    fails(&other, &["pull", "acme/busybox:2", dest], "NAME_UNKNOWN");
    fails(&other, &["image", "public", "acme/busybox"], "not found");
    let out = ok(&s.user, &["image", "public", "busybox"]);
    assert_eq!(out.trim(), "repository acme/busybox is public");
    ok(&other, &["pull", "acme/busybox:2", dest]);
    fails(&other, &["push", layout, "acme/busybox:3"], "NAME_UNKNOWN");
    ok(&s.user, &["image", "private", "busybox"]);
    fails(&other, &["pull", "acme/busybox:2", dest], "NAME_UNKNOWN");

    // The whole repository, then its content with a collection (platform admin only).
    let out = ok(&s.user, &["image", "rm", "busybox"]);
    assert_eq!(out.trim(), "repository acme/busybox deleted");
    fails(&s.user, &["image", "gc"], "platform-admin");
    let report: Value =
        serde_json::from_str(&ok(&admin, &["image", "gc", "--grace", "0s", "-o", "json"])).unwrap();
    // busybox's blobs are still linked by tools/bb: only nothing or untagged leftovers go.
    assert_eq!(report["deleted"], 0, "{report}");
    ok(&s.user, &["image", "rm", "acme/tools/bb"]);
    let report: Value =
        serde_json::from_str(&ok(&admin, &["image", "gc", "--grace", "0s", "-o", "json"])).unwrap();
    assert_eq!(report["deleted"], 3, "manifest, config, layer: {report}");
    let list = ls(&s.user);
    assert_eq!(list["items"], json!([]));
    assert_eq!(list["usage_bytes"], 0);
    let blobs = s.data.join("registry/blobs/sha256");
    assert_eq!(std::fs::read_dir(blobs).unwrap().count(), 0);
}
