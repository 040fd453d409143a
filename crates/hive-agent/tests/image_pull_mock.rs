//! The image store against an in-process registry (axum) that demands bearer tokens from a
//! token endpoint guarded by Basic credentials, and serves hostile or broken images: an index
//! without the node's architecture, a layer whose bytes do not match its digest, a missing
//! blob, a wrong diff-id, a gzip bomb. Each must fail with its own error, leaving nothing
//! half-written in the store.

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hive_agent::image::registry::RegistryError;
use hive_agent::image::unpack::UnpackError;
use hive_agent::image::{Credentials, ImageError, ImageStore, Limits, StoreConfig};

const TOKEN: &str = "tok-123";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const GZIP_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

#[derive(Default)]
struct Mock {
    /// path -> (content type, body)
    docs: Mutex<HashMap<String, (String, Vec<u8>)>>,
    token_requests: AtomicUsize,
    realm: Mutex<String>,
}

fn sha(b: &[u8]) -> String {
    format!(
        "sha256:{}",
        hex::encode(ring::digest::digest(&ring::digest::SHA256, b))
    )
}

async fn handle(State(m): State<Arc<Mock>>, headers: HeaderMap, req: Request) -> Response {
    let path = req.uri().path().to_owned();
    if path == "/token" {
        m.token_requests.fetch_add(1, Ordering::SeqCst);
        // alice:secret
        let ok = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            == Some("Basic YWxpY2U6c2VjcmV0");
        let query = req.uri().query().unwrap_or("");
        if !ok || !query.contains("scope=repository%3A") || !query.contains("service=mock") {
            return StatusCode::UNAUTHORIZED.into_response();
        }
        return (
            [(header::CONTENT_TYPE, "application/json")],
            format!(r#"{{"token":"{TOKEN}"}}"#),
        )
            .into_response();
    }
    let authorized = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        == Some(&format!("Bearer {TOKEN}"));
    if !authorized {
        let repo = path
            .trim_start_matches("/v2/")
            .split("/manifests/")
            .next()
            .unwrap_or("")
            .split("/blobs/")
            .next()
            .unwrap_or("")
            .to_owned();
        let realm = m.realm.lock().expect("lock").clone();
        return (
            StatusCode::UNAUTHORIZED,
            [(
                header::WWW_AUTHENTICATE,
                format!(r#"Bearer realm="{realm}",service="mock",scope="repository:{repo}:pull""#),
            )],
        )
            .into_response();
    }
    match m.docs.lock().expect("lock").get(&path) {
        Some((ct, body)) => ([(header::CONTENT_TYPE, ct.clone())], body.clone()).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

struct Server {
    mock: Arc<Mock>,
    host: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve() -> Server {
    let mock = Arc::new(Mock::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let host = listener.local_addr().expect("addr").to_string();
    *mock.realm.lock().expect("lock") = format!("http://{host}/token");
    let app = axum::Router::new()
        .fallback(handle)
        .with_state(mock.clone());
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Server { mock, host, task }
}

impl Server {
    fn put(&self, path: String, ct: &str, body: Vec<u8>) {
        self.mock
            .docs
            .lock()
            .expect("lock")
            .insert(path, (ct.to_owned(), body));
    }

    fn blob(&self, repo: &str, body: Vec<u8>) -> String {
        let d = sha(&body);
        self.put(
            format!("/v2/{repo}/blobs/{d}"),
            "application/octet-stream",
            body,
        );
        d
    }

    /// Publishes an image whose layers are the given tarballs (gzip), returns the manifest
    /// digest. `arch` goes in the config.
    fn image(&self, repo: &str, tag: &str, arch: &str, layers: &[Vec<u8>], cmd: bool) -> String {
        let mut descs = Vec::new();
        let mut diff_ids = Vec::new();
        for tar in layers {
            let gz = gzip(tar);
            diff_ids.push(sha(tar));
            let size = gz.len();
            let d = self.blob(repo, gz);
            descs.push(serde_json::json!({"mediaType": GZIP_LAYER, "digest": d, "size": size}));
        }
        let mut config = serde_json::json!({
            "architecture": arch, "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "config": {"Env": ["A=1"]},
        });
        if cmd {
            config["config"]["Cmd"] = serde_json::json!(["/bin/true"]);
        }
        let config = serde_json::to_vec(&config).expect("json");
        let config_size = config.len();
        let config_digest = self.blob(repo, config);
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": config_digest, "size": config_size},
            "layers": descs,
        }))
        .expect("json");
        let digest = sha(&manifest);
        self.put(
            format!("/v2/{repo}/manifests/{digest}"),
            OCI_MANIFEST,
            manifest.clone(),
        );
        self.put(
            format!("/v2/{repo}/manifests/{tag}"),
            OCI_MANIFEST,
            manifest,
        );
        digest
    }

    fn index(&self, repo: &str, tag: &str, entries: &[(&str, &str)]) {
        self.index_of(OCI_INDEX, repo, tag, entries);
    }

    fn index_of(&self, media_type: &str, repo: &str, tag: &str, entries: &[(&str, &str)]) {
        let manifests: Vec<_> = entries
            .iter()
            .map(|(arch, digest)| {
                serde_json::json!({"mediaType": OCI_MANIFEST, "digest": digest, "size": 1,
                                   "platform": {"architecture": arch, "os": "linux"}})
            })
            .collect();
        let index = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": media_type, "manifests": manifests}))
        .expect("json");
        self.put(format!("/v2/{repo}/manifests/{tag}"), media_type, index);
    }
}

fn gzip(b: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(b).expect("gzip");
    e.finish().expect("gzip")
}

fn tar_with(name: &str, data: &[u8]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_path(name).expect("path");
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_cksum();
    b.append(&h, data).expect("append");
    b.into_inner().expect("tar")
}

fn store_for(server: &Server, dir: &std::path::Path, password: &str) -> ImageStore {
    let mut cfg = StoreConfig::new(dir);
    cfg.insecure_registries = vec![server.host.clone()];
    cfg.credentials.insert(
        server.host.clone(),
        Credentials {
            username: "alice".into(),
            password: password.into(),
        },
    );
    cfg.limits = Limits {
        max_bytes: 4 << 20,
        max_entries: 1000,
    };
    ImageStore::open(cfg).expect("open")
}

fn tmp_is_empty(dir: &std::path::Path) -> bool {
    std::fs::read_dir(dir.join("tmp"))
        .map(|mut d| d.next().is_none())
        .unwrap_or(false)
}

#[tokio::test]
async fn bearer_auth_index_and_config() {
    let server = serve().await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let amd = server.image(
        "acme/multi",
        "amd64-only",
        "amd64",
        &[tar_with("hello", b"amd")],
        false,
    );
    let arm = server.image(
        "acme/multi",
        "arm64-only",
        "arm64",
        &[tar_with("hello", b"arm")],
        false,
    );
    server.index("acme/multi", "v1", &[("arm64", &arm), ("amd64", &amd)]);

    let store = store_for(&server, tmp.path(), "secret");
    let reference = format!("{}/acme/multi:v1", server.host);
    let img = store.pull(&reference).await.expect("pull");
    assert_eq!(
        img.manifest_digest, amd,
        "the node's platform is picked from the index"
    );
    assert_eq!(
        std::fs::read(store.layer_dir(&img.layers[0].digest).join("hello")).expect("read"),
        b"amd"
    );
    assert_eq!(img.config.env, ["A=1"]);
    // No entrypoint and no cmd: exposed as a distinct error for the caller to decide.
    let err = img.config.command(&reference).expect_err("no command");
    assert!(
        err.to_string().contains("neither entrypoint nor cmd"),
        "{err}"
    );
    // One token for the repository, reused for every request after the first challenge.
    assert_eq!(server.mock.token_requests.load(Ordering::SeqCst), 1);
    assert!(store.get(&reference).expect("get").is_some());
}

#[tokio::test]
async fn wrong_credentials_are_an_auth_error() {
    let server = serve().await;
    let tmp = tempfile::tempdir().expect("tempdir");
    server.image("acme/x", "v1", "amd64", &[tar_with("a", b"a")], true);
    let store = store_for(&server, tmp.path(), "wrong");
    let err = store
        .pull(&format!("{}/acme/x:v1", server.host))
        .await
        .expect_err("refused");
    assert!(
        matches!(
            &err,
            ImageError::Registry {
                source: RegistryError::Auth { .. },
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn unknown_architecture_is_a_clear_error() {
    let server = serve().await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let arm = server.image("acme/arm", "a", "arm64", &[tar_with("a", b"a")], true);
    let s390 = server.image("acme/arm", "s", "s390x", &[tar_with("a", b"a")], true);
    server.index("acme/arm", "v1", &[("arm64", &arm), ("s390x", &s390)]);
    let store = store_for(&server, tmp.path(), "secret");
    let err = store
        .pull(&format!("{}/acme/arm:v1", server.host))
        .await
        .expect_err("no amd64");
    let msg = err.to_string();
    assert!(
        matches!(err, ImageError::UnknownArchitecture { .. }),
        "{msg}"
    );
    assert!(
        msg.contains("linux/arm64") && msg.contains("linux/s390x"),
        "{msg}"
    );
    // A plain manifest for another architecture is refused the same way.
    let err = store
        .pull(&format!("{}/acme/arm:a", server.host))
        .await
        .expect_err("arm64 manifest");
    assert!(
        matches!(err, ImageError::UnknownArchitecture { .. }),
        "{err}"
    );
}

#[tokio::test]
async fn digest_mismatch_missing_blob_and_bad_diff_id() {
    let server = serve().await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = store_for(&server, tmp.path(), "secret");

    // A layer whose bytes are not what its digest says.
    server.image("acme/corrupt", "v1", "amd64", &[tar_with("a", b"a")], true);
    let layer_path = {
        let docs = server.mock.docs.lock().expect("lock");
        let m: serde_json::Value =
            serde_json::from_slice(&docs["/v2/acme/corrupt/manifests/v1"].1).expect("json");
        format!(
            "/v2/acme/corrupt/blobs/{}",
            m["layers"][0]["digest"].as_str().expect("digest")
        )
    };
    let good = server.mock.docs.lock().expect("lock")[&layer_path]
        .1
        .clone();
    let mut evil = gzip(&tar_with("a", b"b"));
    evil.resize(good.len(), 0);
    server.put(layer_path.clone(), "application/octet-stream", evil);
    let reference = format!("{}/acme/corrupt:v1", server.host);
    let err = store.pull(&reference).await.expect_err("mismatch");
    assert!(
        matches!(
            &err,
            ImageError::Layer {
                source: RegistryError::DigestMismatch { .. },
                ..
            }
        ),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.starts_with("pull layer sha256:") && msg.contains(&reference),
        "{msg}"
    );
    assert!(msg.contains("digest mismatch"), "{msg}");

    // The blob is gone from the registry.
    server.mock.docs.lock().expect("lock").remove(&layer_path);
    let err = store.pull(&reference).await.expect_err("missing");
    assert!(
        matches!(
            &err,
            ImageError::Layer {
                source: RegistryError::NotFound { .. },
                ..
            }
        ),
        "{err}"
    );

    // The config's diff-id does not match the layer's content.
    let tar = tar_with("a", b"a");
    let gz = gzip(&tar);
    let size = gz.len();
    let ld = server.blob("acme/diff", gz);
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [sha(b"something else")]}}))
    .expect("json");
    let cs = config.len();
    let cd = server.blob("acme/diff", config);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
        "layers": [{"mediaType": GZIP_LAYER, "digest": ld, "size": size}]}))
    .expect("json");
    server.put("/v2/acme/diff/manifests/v1".into(), OCI_MANIFEST, manifest);
    let err = store
        .pull(&format!("{}/acme/diff:v1", server.host))
        .await
        .expect_err("diff-id");
    assert!(matches!(err, ImageError::DiffIdMismatch { .. }), "{err}");

    // Nothing half-written is left behind.
    assert!(tmp_is_empty(tmp.path()));
    assert_eq!(
        std::fs::read_dir(tmp.path().join("layers"))
            .expect("layers")
            .count(),
        0
    );
}

#[tokio::test]
async fn gzip_bomb_is_refused_and_cleaned_up() {
    let server = serve().await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = store_for(&server, tmp.path(), "secret");
    // 16 MiB of zeros against a 4 MiB limit.
    let bomb = tar_with("zeros", &vec![0u8; 16 << 20]);
    server.image("acme/bomb", "v1", "amd64", &[bomb], true);
    let err = store
        .pull(&format!("{}/acme/bomb:v1", server.host))
        .await
        .expect_err("bomb");
    assert!(
        matches!(
            &err,
            ImageError::Unpack {
                source: UnpackError::TooLarge { .. },
                ..
            }
        ),
        "{err}"
    );
    assert!(tmp_is_empty(tmp.path()));
    assert_eq!(
        std::fs::read_dir(tmp.path().join("layers"))
            .expect("layers")
            .count(),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_stores_on_one_root_unpack_each_layer_once() {
    // Two stores on one root stand for two agent processes: the per-layer lock does not span
    // them, so the atomic rename of the finished layer dir must.
    let server = serve().await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let layers: Vec<Vec<u8>> = (0..6)
        .map(|i| tar_with(&format!("f{i}"), &vec![i as u8; 256 << 10]))
        .collect();
    server.image("acme/many", "v1", "amd64", &layers, true);
    let a = store_for(&server, tmp.path(), "secret");
    let b = store_for(&server, tmp.path(), "secret");
    let reference = format!("{}/acme/many:v1", server.host);
    let (ia, ib, ic) = tokio::join!(a.pull(&reference), b.pull(&reference), a.pull(&reference));
    let (ia, ib, ic) = (ia.expect("a"), ib.expect("b"), ic.expect("c"));
    assert_eq!(ia.layers, ib.layers);
    assert_eq!(ia.layers, ic.layers);
    assert_eq!(
        std::fs::read_dir(tmp.path().join("layers"))
            .expect("layers")
            .count(),
        6
    );
    for (i, l) in ia.layers.iter().enumerate() {
        let dir = a.layer_dir(&l.digest);
        let names: Vec<_> = std::fs::read_dir(&dir)
            .expect("layer")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, [std::ffi::OsString::from(format!("f{i}"))]);
    }
    assert!(tmp_is_empty(tmp.path()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rootfs_of_sixty_layers() {
    // 60 lowerdirs of ~90 characters overflow mount(2)'s one-page option string; the store
    // must still compose the rootfs (fsconfig with lowerdir+). Needs root.
    assert!(
        rustix::process::geteuid().is_root(),
        "this test mounts overlayfs and must run as root"
    );
    let server = serve().await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let layers: Vec<Vec<u8>> = (0..60)
        .map(|i| tar_with(&format!("l/{i:02}"), format!("{i}").as_bytes()))
        .collect();
    server.image("acme/sixty", "v1", "amd64", &layers, true);
    let store = store_for(&server, tmp.path(), "secret");
    let img = store
        .pull(&format!("{}/acme/sixty:v1", server.host))
        .await
        .expect("pull");
    let lower_len: usize = img
        .layers
        .iter()
        .map(|l| store.layer_dir(&l.digest).as_os_str().len() + 1)
        .sum();
    assert!(lower_len > 4096, "test must exceed one page ({lower_len})");
    let rootfs = store.compose_rootfs(&img, "sixty").await.expect("compose");
    let guard = Unmount(rootfs.path.clone());
    let n = std::fs::read_dir(rootfs.path.join("l")).expect("l").count();
    assert_eq!(n, 60);
    std::fs::write(rootfs.path.join("kept"), b"upper").expect("write");

    // As after a reboot: the mount is gone, the instance dir is not.
    rustix::mount::unmount(&rootfs.path, rustix::mount::UnmountFlags::empty()).expect("umount");
    assert!(!rootfs.path.join("l").exists());
    let again = store.remount_rootfs("sixty").await.expect("remount");
    assert_eq!(again.path, rootfs.path);
    assert_eq!(
        std::fs::read(again.path.join("kept")).expect("kept"),
        b"upper"
    );
    assert_eq!(std::fs::read(again.path.join("l/07")).expect("l/07"), b"7");
    store
        .remount_rootfs("sixty")
        .await
        .expect("no-op when mounted");
    let errs = store.release_rootfs("sixty");
    assert!(errs.is_empty(), "{errs:?}");
    assert!(!tmp.path().join("instances/sixty").exists());
    drop(guard);
}

struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = rustix::mount::unmount(&self.0, rustix::mount::UnmountFlags::DETACH);
    }
}

#[tokio::test]
async fn manifest_by_digest_is_verified() {
    let server = serve().await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = store_for(&server, tmp.path(), "secret");
    let digest = server.image("acme/pinned", "v1", "amd64", &[tar_with("a", b"a")], true);
    // The registry answers the pinned digest with another document.
    let other = server.image("acme/pinned", "v2", "amd64", &[tar_with("b", b"b")], true);
    let body = server.mock.docs.lock().expect("lock")
        [&format!("/v2/acme/pinned/manifests/{other}")]
        .1
        .clone();
    server.put(
        format!("/v2/acme/pinned/manifests/{digest}"),
        OCI_MANIFEST,
        body,
    );
    let err = store
        .pull(&format!("{}/acme/pinned@{digest}", server.host))
        .await
        .expect_err("mismatch");
    assert!(
        matches!(
            &err,
            ImageError::Registry {
                source: RegistryError::DigestMismatch { .. },
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn gc_keeps_layers_shared_with_kept_images() {
    let server = serve().await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = store_for(&server, tmp.path(), "secret");
    let base = tar_with("base", b"shared");
    server.image(
        "acme/a",
        "v1",
        "amd64",
        &[base.clone(), tar_with("a", b"a")],
        true,
    );
    server.image("acme/b", "v1", "amd64", &[base, tar_with("b", b"b")], true);
    let a_ref = format!("{}/acme/a:v1", server.host);
    let a = store.pull(&a_ref).await.expect("a");
    let b = store
        .pull(&format!("{}/acme/b:v1", server.host))
        .await
        .expect("b");
    assert_eq!(a.layers[0], b.layers[0], "the base layer is one layer");
    let count = || {
        std::fs::read_dir(tmp.path().join("layers"))
            .expect("layers")
            .count()
    };
    assert_eq!(count(), 3);

    // Under budget: nothing goes.
    let r = store.gc(u64::MAX).await.expect("gc");
    assert!(
        r.images_removed.is_empty() && r.layers_removed.is_empty(),
        "{r:?}"
    );

    store.remove_image(&a_ref).await.expect("remove a");
    let r = store.gc(u64::MAX).await.expect("gc");
    assert_eq!(r.layers_removed, [a.layers[1].digest.clone()]);
    assert_eq!(count(), 2);
    assert!(store.layer_dir(&b.layers[0].digest).join("base").is_file());
    assert!(matches!(
        store.remove_image(&a_ref).await,
        Err(ImageError::NotPresent(_))
    ));
}

#[tokio::test]
async fn gc_keeps_the_layers_an_instance_mounts_after_its_tag_moved() {
    let server = serve().await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = store_for(&server, tmp.path(), "secret");
    server.image("acme/moving", "v1", "amd64", &[tar_with("old", b"o")], true);
    let r = format!("{}/acme/moving:v1", server.host);
    let old = store.pull(&r).await.expect("pull");
    let rootfs = store
        .compose_rootfs(&old, "mover-1")
        .await
        .expect("compose");
    let guard = Unmount(rootfs.path.clone());
    // The tag moves and the node pulls it again: the image's record names the new layer.
    server.image("acme/moving", "v1", "amd64", &[tar_with("new", b"n")], true);
    let new = store.pull(&r).await.expect("pull again");
    assert_ne!(new.layers, old.layers);
    let report = store.gc(u64::MAX).await.expect("gc");
    assert!(report.layers_removed.is_empty(), "{report:?}");
    assert!(
        rootfs.path.join("old").is_file(),
        "the instance lost its layer"
    );
    // Mounted again (as after a reboot), it is over the layers it was composed over.
    rustix::mount::unmount(&rootfs.path, rustix::mount::UnmountFlags::empty()).expect("umount");
    store.remount_rootfs("mover-1").await.expect("remount");
    assert!(rootfs.path.join("old").is_file() && !rootfs.path.join("new").exists());
    // Once the instance is gone, the layer only it used goes.
    let errs = store.release_rootfs("mover-1");
    assert!(errs.is_empty(), "{errs:?}");
    drop(guard);
    let report = store.gc(u64::MAX).await.expect("gc");
    assert_eq!(report.layers_removed, [old.layers[0].digest.clone()]);
    assert!(store.layer_dir(&new.layers[0].digest).join("new").is_file());
}

#[tokio::test]
async fn gc_over_budget_evicts_least_recently_used_first() {
    let server = serve().await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = store_for(&server, tmp.path(), "secret");
    let mut refs = Vec::new();
    for name in ["old", "mid", "new"] {
        server.image(
            &format!("acme/{name}"),
            "v1",
            "amd64",
            &[tar_with(name, &[0u8; 4096])],
            true,
        );
        let r = format!("{}/acme/{name}:v1", server.host);
        store.pull(&r).await.expect("pull");
        refs.push(r);
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let before = store.gc(u64::MAX).await.expect("gc").bytes_before;
    // Room for two images of the three: only the oldest goes.
    let r = store.gc(before - 1).await.expect("gc");
    assert_eq!(r.images_removed, [refs[0].clone()]);
    assert_eq!(r.layers_removed.len(), 1);
    assert!(r.bytes_after < before);
    assert!(store.get(&refs[1]).expect("get").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_layer_leaves_no_temporary_files() {
    let server = serve().await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = store_for(&server, tmp.path(), "secret");
    let layers: Vec<Vec<u8>> = (0..8)
        .map(|i| tar_with(&format!("f{i}"), &vec![i as u8; 512 << 10]))
        .collect();
    server.image("acme/partial", "v1", "amd64", &layers, true);
    // Remove one layer blob from the registry: the pull fails while others are in flight.
    let missing = {
        let docs = server.mock.docs.lock().expect("lock");
        let m: serde_json::Value =
            serde_json::from_slice(&docs["/v2/acme/partial/manifests/v1"].1).expect("json");
        format!(
            "/v2/acme/partial/blobs/{}",
            m["layers"][5]["digest"].as_str().expect("digest")
        )
    };
    server.mock.docs.lock().expect("lock").remove(&missing);
    let err = store
        .pull(&format!("{}/acme/partial:v1", server.host))
        .await
        .expect_err("missing layer");
    assert!(matches!(err, ImageError::Layer { .. }), "{err}");
    // Unpacks already handed to blocking threads finish on their own; give them a moment.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !tmp_is_empty(tmp.path()) {
        assert!(std::time::Instant::now() < deadline, "tmp/ not cleaned up");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // An interrupted GC's leftover (a layer dir without metadata) does not block a pull.
    let stale = tmp.path().join("layers").join("0".repeat(64));
    std::fs::create_dir_all(stale.join("fs")).expect("mkdir");
    server.image("acme/ok", "v1", "amd64", &[tar_with("ok", b"ok")], true);
    store
        .pull(&format!("{}/acme/ok:v1", server.host))
        .await
        .expect("pull");
    let r = store.gc(u64::MAX).await.expect("gc");
    assert!(
        r.layers_removed
            .contains(&format!("sha256:{}", "0".repeat(64))),
        "{r:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_manifest_list_and_an_image_without_layers() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test mounts overlayfs and must run as root"
    );
    let server = serve().await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = store_for(&server, tmp.path(), "secret");
    let amd = server.image("acme/empty", "amd", "amd64", &[], true);
    let arm = server.image("acme/empty", "arm", "arm64", &[], true);
    server.index_of(
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "acme/empty",
        "v1",
        &[("arm64", &arm), ("amd64", &amd)],
    );
    let img = store
        .pull(&format!("{}/acme/empty:v1", server.host))
        .await
        .expect("pull");
    assert_eq!(img.manifest_digest, amd);
    assert!(img.layers.is_empty());
    let rootfs = store.compose_rootfs(&img, "empty").await.expect("compose");
    let guard = Unmount(rootfs.path.clone());
    assert_eq!(std::fs::read_dir(&rootfs.path).expect("rootfs").count(), 0);
    let errs = store.release_rootfs("empty");
    assert!(errs.is_empty(), "{errs:?}");
    drop(guard);
}
