//! End to end: Debian's `docker-registry` on a free 127.0.0.1 port, images built locally with
//! umoci (busybox-static, and a two-layer image with a whiteout and an opaque dir), pushed
//! with skopeo (Docker schema 2 + gzip, and OCI + zstd), pulled by the image store, unpacked,
//! composed into overlay root filesystems (needs root), released and garbage-collected.
//!
//! Needs root and the Debian packages docker-registry, skopeo, umoci, busybox-static
//! (`scripts/deps.sh` installs them). A missing one fails the test; it never skips.

use std::net::TcpStream;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hive_agent::image::{ImageError, ImageStore, StoreConfig};

fn need(tool: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{tool} not found: install the Debian packages docker-registry skopeo umoci busybox-static (scripts/deps.sh)"
    );
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new("timeout")
        .arg("120")
        .arg(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Kills the registry (by its pid) however the test ends.
struct Registry {
    child: Child,
    port: u16,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_registry(dir: &Path) -> Registry {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let storage = dir.join("registry");
    std::fs::create_dir_all(&storage).expect("mkdir");
    let cfg = dir.join("registry.yml");
    std::fs::write(
        &cfg,
        format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  cache:\n    blobdescriptor: inmemory\n  delete:\n    enabled: true\n  maintenance:\n    uploadpurging:\n      enabled: false\nhttp:\n  addr: 127.0.0.1:{port}\n",
            storage.display()
        ),
    )
    .expect("write config");
    let log = std::fs::File::create(dir.join("registry.log")).expect("log");
    let child = Command::new("docker-registry")
        .arg("serve")
        .arg(&cfg)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("start docker-registry");
    let reg = Registry { child, port };
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "docker-registry did not listen on {port}: {}",
            std::fs::read_to_string(dir.join("registry.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    reg
}

/// Unmounts whatever the test mounted, even when an assertion failed midway.
struct Mounts(Vec<PathBuf>);

impl Drop for Mounts {
    fn drop(&mut self) {
        for m in &self.0 {
            let _ = rustix::mount::unmount(m, rustix::mount::UnmountFlags::DETACH);
        }
    }
}

fn new_image(layout: &Path, name: &str) -> String {
    let img = format!("{}:{name}", layout.display());
    if !layout.exists() {
        run("umoci", &["init", "--layout", &layout.to_string_lossy()]);
    }
    run("umoci", &["new", "--image", &img]);
    img
}

fn build_busybox(oci: &Path) -> String {
    let img = new_image(oci, "busybox");
    run(
        "umoci",
        &[
            "config",
            "--image",
            &img,
            "--config.cmd",
            "/bin/sh",
            "--config.env",
            "PATH=/bin:/sbin:/usr/bin:/usr/sbin",
            "--config.workingdir",
            "/root",
            "--config.exposedports",
            "8080/tcp",
            "--config.stopsignal",
            "SIGTERM",
            "--architecture",
            "amd64",
            "--os",
            "linux",
        ],
    );
    let bundle = oci.with_file_name("busybox.bundle");
    run(
        "umoci",
        &["unpack", "--image", &img, &bundle.to_string_lossy()],
    );
    let rootfs = bundle.join("rootfs");
    for d in ["bin", "sbin", "usr/bin", "usr/sbin", "etc", "tmp", "root"] {
        std::fs::create_dir_all(rootfs.join(d)).expect("mkdir");
    }
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).expect("copy busybox");
    run(
        "chroot",
        &[&rootfs.to_string_lossy(), "/bin/busybox", "--install", "-s"],
    );
    std::fs::write(rootfs.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").expect("passwd");
    run(
        "umoci",
        &["repack", "--image", &img, &bundle.to_string_lossy()],
    );
    img
}

fn tar_of(entries: &[(&str, Option<&[u8]>)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in entries {
        let mut h = tar::Header::new_ustar();
        h.set_path(path).expect("path");
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        match data {
            Some(d) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(d.len() as u64);
                h.set_mode(0o644);
                h.set_cksum();
                b.append(&h, *d).expect("append");
            }
            None => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                h.set_mode(0o755);
                h.set_cksum();
                b.append(&h, std::io::empty()).expect("append");
            }
        }
    }
    b.into_inner().expect("tar")
}

/// Two layers: the second whites out `etc/a` and makes `opq/` opaque (hiding `x`, `y`).
fn build_layered(oci: &Path, work: &Path) -> String {
    let img = new_image(oci, "layered");
    run(
        "umoci",
        &[
            "config",
            "--image",
            &img,
            "--config.entrypoint",
            "/bin/app",
            "--architecture",
            "amd64",
            "--os",
            "linux",
        ],
    );
    let l1 = tar_of(&[
        ("etc/", None),
        ("etc/a", Some(b"a")),
        ("etc/b", Some(b"b")),
        ("opq/", None),
        ("opq/x", Some(b"x")),
        ("opq/y", Some(b"y")),
    ]);
    let l2 = tar_of(&[
        ("etc/", None),
        ("etc/.wh.a", Some(b"")),
        ("opq/", None),
        ("opq/.wh..wh..opq", Some(b"")),
        ("opq/z", Some(b"z")),
    ]);
    for (name, t) in [("l1.tar", l1), ("l2.tar", l2)] {
        let p = work.join(name);
        std::fs::write(&p, t).expect("write layer");
        run(
            "umoci",
            &["raw", "add-layer", "--image", &img, &p.to_string_lossy()],
        );
    }
    img
}

fn push(src: &str, dest: &str, extra: &[&str]) {
    let from = format!("oci:{src}");
    let to = format!("docker://{dest}");
    let mut args = vec!["copy", "--quiet", "--dest-tls-verify=false"];
    args.extend_from_slice(extra);
    args.push(&from);
    args.push(&to);
    run("skopeo", &args);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_unpack_compose_gc_against_docker_registry() {
    for t in ["docker-registry", "skopeo", "umoci", "chroot", "timeout"] {
        need(t);
    }
    assert!(
        Path::new("/bin/busybox").is_file(),
        "/bin/busybox missing: install busybox-static"
    );
    assert!(
        rustix::process::geteuid().is_root(),
        "this test mounts overlayfs and must run as root"
    );

    // Drop order is the reverse of declaration: mounts, then the registry, then the files.
    let tmp = tempfile::tempdir().expect("tempdir");
    let reg = start_registry(tmp.path());
    let mut mounts = Mounts(Vec::new());
    let host = format!("127.0.0.1:{}", reg.port);

    let oci = tmp.path().join("oci");
    let busybox = build_busybox(&oci);
    let layered = build_layered(&oci, tmp.path());
    push(
        &busybox,
        &format!("{host}/acme/busybox:v1"),
        &["--format", "v2s2"],
    );
    push(
        &layered,
        &format!("{host}/acme/layered:v1"),
        &["--format", "oci", "--dest-compress-format", "zstd"],
    );

    let mut cfg = StoreConfig::new(tmp.path().join("store"));
    cfg.insecure_registries = vec![host.clone()];
    let store = ImageStore::open(cfg).expect("open store");

    // Docker schema 2, gzip.
    let bb_ref = format!("{host}/acme/busybox:v1");
    let bb = store.pull(&bb_ref).await.expect("pull busybox");
    assert_eq!(bb.layers.len(), 1);
    assert_eq!(bb.config.cmd, ["/bin/sh"]);
    assert_eq!(bb.config.env, ["PATH=/bin:/sbin:/usr/bin:/usr/sbin"]);
    assert_eq!(bb.config.working_dir.as_deref(), Some("/root"));
    assert_eq!(bb.config.exposed_ports, ["8080/tcp"]);
    assert_eq!(bb.config.stop_signal.as_deref(), Some("SIGTERM"));
    assert_eq!(bb.config.command(&bb_ref).expect("cmd"), ["/bin/sh"]);
    let bb_layer = store.layer_dir(&bb.layers[0].digest);
    let busybox_md = std::fs::metadata(bb_layer.join("bin/busybox")).expect("busybox in layer");
    assert_eq!(
        busybox_md.len(),
        std::fs::metadata("/bin/busybox").expect("md").len()
    );
    assert!(
        std::fs::symlink_metadata(bb_layer.join("bin/sh"))
            .expect("sh")
            .file_type()
            .is_symlink()
    );

    // By digest: same layers, nothing unpacked again.
    let by_digest = store
        .pull(&format!("{host}/acme/busybox@{}", bb.manifest_digest))
        .await
        .expect("pull by digest");
    assert_eq!(by_digest.layers, bb.layers);
    assert_eq!(
        std::fs::metadata(bb_layer.join("bin/busybox"))
            .expect("md")
            .ino(),
        busybox_md.ino()
    );

    // OCI + zstd, two concurrent pulls of the same image: one unpack per layer.
    let ly_ref = format!("{host}/acme/layered:v1");
    let (a, b) = tokio::join!(store.pull(&ly_ref), store.pull(&ly_ref));
    let (ly, ly2) = (a.expect("pull layered"), b.expect("second pull"));
    assert_eq!(ly2.layers, ly.layers);
    assert_eq!(ly2.manifest_digest, ly.manifest_digest);
    assert_eq!(ly.layers.len(), 2);
    assert_eq!(ly.config.entrypoint, ["/bin/app"]);
    let top = store.layer_dir(&ly.layers[1].digest);
    let wh = std::fs::symlink_metadata(top.join("etc/a")).expect("whiteout");
    assert!(wh.file_type().is_char_device() && wh.rdev() == 0);
    let media_type = |digest: &str| {
        let hex = digest.trim_start_matches("sha256:");
        std::fs::read_to_string(tmp.path().join(format!("store/layers/{hex}/layer.json")))
            .expect("layer.json")
    };
    assert!(
        media_type(&ly.layers[0].digest).contains("application/vnd.oci.image.layer.v1.tar+zstd")
    );
    assert!(
        media_type(&bb.layers[0].digest)
            .contains("application/vnd.docker.image.rootfs.diff.tar.gzip")
    );
    let layer_dirs = std::fs::read_dir(tmp.path().join("store/layers"))
        .expect("layers")
        .count();
    assert_eq!(layer_dirs, 3, "busybox 1 + layered 2 layers, each once");

    // Root filesystems.
    let rb = store
        .compose_rootfs(&bb, "bb-1")
        .await
        .expect("compose busybox");
    mounts.0.push(rb.path.clone());
    assert!(rb.path.join("bin/busybox").is_file());
    std::fs::write(rb.path.join("tmp/written"), b"w").expect("write into rootfs");
    assert!(
        !bb_layer.join("tmp/written").exists(),
        "layer dir must stay untouched"
    );

    let rl = store
        .compose_rootfs(&ly, "ly-1")
        .await
        .expect("compose layered");
    mounts.0.push(rl.path.clone());
    assert!(!rl.path.join("etc/a").exists(), "whiteout hides etc/a");
    assert_eq!(std::fs::read(rl.path.join("etc/b")).expect("etc/b"), b"b");
    let mut opq: Vec<_> = std::fs::read_dir(rl.path.join("opq"))
        .expect("opq")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf8"))
        .collect();
    opq.sort();
    assert_eq!(opq, ["z"], "opaque dir hides the lower layer's entries");

    assert!(matches!(
        store.compose_rootfs(&ly, "ly-1").await,
        Err(ImageError::InstanceExists(_))
    ));
    assert!(matches!(
        store.remove_image(&ly_ref).await,
        Err(ImageError::InUse(..))
    ));

    let errs = store.release_rootfs("ly-1");
    assert!(errs.is_empty(), "{errs:?}");
    assert!(!hive_agent::image::overlay::is_mountpoint(&rl.path));
    assert!(!tmp.path().join("store/instances/ly-1").exists());

    // GC with a zero budget: the unused images go (the layered one, and the busybox record
    // pulled by digest); the layered image's two layers go; busybox:v1 is in use by bb-1 and
    // stays, with its layer.
    let report = store.gc(0).await.expect("gc");
    let mut removed = report.images_removed.clone();
    removed.sort();
    assert_eq!(removed, [by_digest.reference.clone(), ly_ref.clone()]);
    assert_eq!(report.layers_removed.len(), 2);
    assert!(bb_layer.join("bin/busybox").is_file());
    assert!(store.get(&ly_ref).expect("get").is_none());

    let errs = store.release_rootfs("bb-1");
    assert!(errs.is_empty(), "{errs:?}");
    let report = store.gc(u64::MAX).await.expect("gc");
    assert!(
        report.images_removed.is_empty(),
        "under budget: nothing evicted"
    );
    let report = store.gc(0).await.expect("gc");
    assert_eq!(report.images_removed, [bb_ref]);
    assert_eq!(report.bytes_after, 0);
    assert_eq!(
        std::fs::read_dir(tmp.path().join("store/layers"))
            .expect("layers")
            .count(),
        0
    );

    // A tag that does not exist is a registry not-found error naming the reference.
    let err = store
        .pull(&format!("{host}/acme/busybox:nope"))
        .await
        .expect_err("missing tag");
    assert!(
        matches!(
            err,
            ImageError::Registry {
                source: hive_agent::image::registry::RegistryError::NotFound { .. },
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("acme/busybox:nope"), "{err}");
    drop(mounts);
    drop(reg);
}
