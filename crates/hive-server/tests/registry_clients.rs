//! The registry through real clients: a busybox OCI image built locally (umoci +
//! busybox-static) is pushed and pulled with `skopeo` and `podman` against an in-process
//! `hive_server::serve` on 127.0.0.1, with tenant tokens; the round trip is byte-identical
//! by digest, and another tenant's token sees the repository as unknown.
//!
//! Needs skopeo, podman, umoci and busybox-static (`scripts/deps.sh`): fails when missing.
//! Every client runs with private storage and auth files under a temp dir.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request, header};
use hive_server::{AppState, RateLimit, ServerConfig};
use hive_store::{RedbStore, Store};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

fn need(tool: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{tool} is not installed: run scripts/deps.sh (this test needs it)"
    );
}

struct Out {
    ok: bool,
    stdout: String,
    stderr: String,
}

async fn run(cmd: &str, args: &[&str], env: &[(&str, &Path)]) -> Out {
    let mut c = tokio::process::Command::new(cmd);
    c.args(args).kill_on_drop(true);
    for (k, v) in env {
        c.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(120), c.output())
        .await
        .unwrap_or_else(|_| panic!("{cmd} {args:?} timed out"))
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    Out {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

async fn must(cmd: &str, args: &[&str], env: &[(&str, &Path)]) -> String {
    let o = run(cmd, args, env).await;
    assert!(o.ok, "{cmd} {args:?} failed:\n{}\n{}", o.stdout, o.stderr);
    o.stdout
}

/// An OCI layout at `dir` with image `test`: busybox and a few applet links, one layer.
async fn build_busybox(dir: &Path) {
    let layout = dir.to_str().unwrap();
    let image = format!("{layout}:test");
    must("umoci", &["init", "--layout", layout], &[]).await;
    must("umoci", &["new", "--image", &image], &[]).await;
    must(
        "umoci",
        &[
            "config",
            "--image",
            &image,
            "--config.cmd",
            "/bin/sh",
            "--architecture",
            "amd64",
            "--os",
            "linux",
        ],
        &[],
    )
    .await;
    let bundle = dir.with_extension("bundle");
    let b = bundle.to_str().unwrap();
    must("umoci", &["unpack", "--image", &image, b], &[]).await;
    let bin = bundle.join("rootfs/bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy("/bin/busybox", bin.join("busybox")).unwrap();
    for applet in ["sh", "true", "ls", "cat"] {
        std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
    }
    must("umoci", &["repack", "--image", &image, b], &[]).await;
    std::fs::remove_dir_all(&bundle).unwrap();
}

fn manifest_digest(layout: &Path) -> String {
    let index: Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    index["manifests"][0]["digest"].as_str().unwrap().to_owned()
}

struct Server {
    addr: String,
    admin: String,
    acme_member: String,
    acme_viewer: String,
    other_member: String,
    app: axum::Router,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Server {
    /// An API request through the served application; `(status, json body)`.
    async fn api(
        &self,
        method: Method,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
            .unwrap();
        let resp = self.app.clone().oneshot(req).await.unwrap();
        let status = resp.status().as_u16();
        let b = resp.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&b).unwrap_or(Value::Null))
    }

    async fn stop(mut self) {
        self.stop.take().map(|s| s.send(()));
        tokio::time::timeout(Duration::from_secs(10), &mut self.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}

async fn start(data: &Path) -> Server {
    let store: Arc<dyn Store> =
        Arc::new(RedbStore::open(data.join("state.redb"), Default::default()).unwrap());
    hive_server::bootstrap(&store, data).await.unwrap();
    let admin = std::fs::read_to_string(data.join("admin.token"))
        .unwrap()
        .trim()
        .to_owned();
    let config = ServerConfig {
        data_dir: data.to_owned(),
        rate_limit: RateLimit {
            per_sec: 0.0,
            burst: 0.0,
        },
        ..Default::default()
    };
    let app = hive_server::router(AppState::new(store, config));
    let call = |path: String, body: Value| {
        let app = app.clone();
        let admin = admin.clone();
        async move {
            let req = Request::builder()
                .method(Method::POST)
                .uri(path)
                .header(header::AUTHORIZATION, format!("Bearer {admin}"))
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(body.to_string()))
                .unwrap();
            let resp = app.oneshot(req).await.unwrap();
            assert!(resp.status().is_success());
            let b = resp.into_body().collect().await.unwrap().to_bytes();
            serde_json::from_slice::<Value>(&b).unwrap()
        }
    };
    for t in ["acme", "other"] {
        call("/api/v1/tenants".into(), json!({"name": t})).await;
    }
    let token = |t: &'static str, role: &'static str| async move {
        call(
            format!("/api/v1/tenants/{t}/tokens"),
            json!({"name": "ci", "role": role}),
        )
        .await["token"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let acme_member = token("acme", "member").await;
    let acme_viewer = token("acme", "viewer").await;
    let other_member = token("other", "member").await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    // The application the tests call in process is the one served: one registry, one state.
    let served = axum::serve(listener, app.clone()).with_graceful_shutdown(async move {
        let _ = rx.await;
    });
    let task = tokio::spawn(async move { served.await });
    Server {
        addr,
        admin,
        acme_member,
        acme_viewer,
        other_member,
        app,
        stop: Some(tx),
        task,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_and_podman_push_and_pull_through_tenant_auth() {
    for t in ["skopeo", "podman", "umoci"] {
        need(t);
    }
    assert!(
        Path::new("/bin/busybox").exists(),
        "busybox-static is not installed: run scripts/deps.sh"
    );
    let tmp = tempfile::tempdir().unwrap();
    let layout: PathBuf = tmp.path().join("busybox");
    build_busybox(&layout).await;
    let want = manifest_digest(&layout);
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let srv = start(&data).await;
    let auth_file = tmp.path().join("auth.json");
    let env: [(&str, &Path); 1] = [("REGISTRY_AUTH_FILE", &auth_file)];
    let authfile = auth_file.to_str().unwrap();
    let reg = srv.addr.clone();
    let src = format!("oci:{}:test", layout.display());
    let dst = format!("docker://{reg}/acme/tools/busybox:1.0");
    let creds = |t: &str| format!("anyone:{t}");

    // skopeo push and pull back, with Basic credentials through the token flow.
    must(
        "skopeo",
        &[
            "copy",
            "--quiet",
            "--authfile",
            authfile,
            "--dest-tls-verify=false",
            "--dest-creds",
            &creds(&srv.acme_member),
            &src,
            &dst,
        ],
        &env,
    )
    .await;
    let pulled = tmp.path().join("pulled");
    must(
        "skopeo",
        &[
            "copy",
            "--quiet",
            "--authfile",
            authfile,
            "--src-tls-verify=false",
            "--src-creds",
            &creds(&srv.acme_viewer),
            &dst,
            &format!("oci:{}:test", pulled.display()),
        ],
        &env,
    )
    .await;
    assert_eq!(
        manifest_digest(&pulled),
        want,
        "pulled manifest differs from the pushed one"
    );
    let inspected = must(
        "skopeo",
        &[
            "inspect",
            "--authfile",
            authfile,
            "--tls-verify=false",
            "--creds",
            &creds(&srv.acme_viewer),
            "--format",
            "{{.Digest}}",
            &dst,
        ],
        &env,
    )
    .await;
    assert_eq!(inspected.trim(), want);
    // Blobs landed on disk under DATA/registry.
    assert!(
        data.join("registry/blobs/sha256")
            .read_dir()
            .unwrap()
            .count()
            >= 3
    );

    // Another tenant: pull and push both see an unknown repository.
    let o = run(
        "skopeo",
        &[
            "inspect",
            "--raw",
            "--authfile",
            authfile,
            "--tls-verify=false",
            "--creds",
            &creds(&srv.other_member),
            &dst,
        ],
        &env,
    )
    .await;
    assert!(
        !o.ok && o.stderr.contains("name unknown"),
        "cross-tenant pull: {}",
        o.stderr
    );
    let o = run(
        "skopeo",
        &[
            "copy",
            "--quiet",
            "--authfile",
            authfile,
            "--dest-tls-verify=false",
            "--dest-creds",
            &creds(&srv.other_member),
            &src,
            &format!("docker://{reg}/acme/evil:1"),
        ],
        &env,
    )
    .await;
    assert!(
        !o.ok && o.stderr.contains("name unknown"),
        "cross-tenant push: {}",
        o.stderr
    );
    // A viewer may not push.
    let o = run(
        "skopeo",
        &[
            "copy",
            "--quiet",
            "--authfile",
            authfile,
            "--dest-tls-verify=false",
            "--dest-creds",
            &creds(&srv.acme_viewer),
            &src,
            &format!("docker://{reg}/acme/viewer-push:1"),
        ],
        &env,
    )
    .await;
    assert!(!o.ok, "viewer push succeeded");
    // Bad password: login fails.
    let o = run(
        "skopeo",
        &[
            "login",
            "--authfile",
            authfile,
            "--tls-verify=false",
            "-u",
            "x",
            "-p",
            "hive_wrong",
            &reg,
        ],
        &env,
    )
    .await;
    assert!(!o.ok, "login with a wrong token succeeded");

    // podman: login, pull, tag, push to another repository, private storage.
    let pod = |args: &[&str]| podman_args(tmp.path(), args);
    let podman = |args: Vec<String>| async move {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        must("podman", &a, &env).await
    };
    podman(pod(&[
        "login",
        "--authfile",
        authfile,
        "--tls-verify=false",
        "-u",
        "acme",
        "-p",
        &srv.acme_member,
        &reg,
    ]))
    .await;
    let image = format!("{reg}/acme/tools/busybox:1.0");
    podman(pod(&[
        "pull",
        "-q",
        "--authfile",
        authfile,
        "--tls-verify=false",
        &image,
    ]))
    .await;
    let copy = format!("{reg}/acme/copy:2");
    podman(pod(&["tag", &image, &copy])).await;
    podman(pod(&[
        "push",
        "-q",
        "--authfile",
        authfile,
        "--tls-verify=false",
        &copy,
    ]))
    .await;
    let listed = must(
        "skopeo",
        &[
            "list-tags",
            "--authfile",
            authfile,
            "--tls-verify=false",
            "--creds",
            &creds(&srv.acme_viewer),
            &format!("docker://{reg}/acme/copy"),
        ],
        &env,
    )
    .await;
    assert!(listed.contains("\"2\""), "{listed}");
    srv.stop().await;
}

/// podman's arguments with private storage under `dir` (vfs, no system store touched).
fn podman_args(dir: &Path, args: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = vec![
        "--root".into(),
        dir.join("podman-root").display().to_string(),
        "--runroot".into(),
        dir.join("podman-run").display().to_string(),
        "--storage-driver".into(),
        "vfs".into(),
    ];
    v.extend(args.iter().map(|s| s.to_string()));
    v
}

/// Writes `bytes` as a blob of the OCI layout at `dir`; returns its descriptor's digest.
fn layout_blob(dir: &Path, bytes: &[u8]) -> String {
    use sha2::Digest as _;
    let hex = hex::encode(sha2::Sha256::digest(bytes));
    std::fs::write(dir.join("blobs/sha256").join(&hex), bytes).unwrap();
    format!("sha256:{hex}")
}

/// Adds a manifest (or index) to the layout's `index.json` under reference `name`.
fn layout_ref(dir: &Path, media_type: &str, bytes: &[u8], name: &str) -> String {
    let digest = layout_blob(dir, bytes);
    let path = dir.join("index.json");
    let mut index: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    index["manifests"].as_array_mut().unwrap().push(json!({
        "mediaType": media_type, "digest": digest, "size": bytes.len(),
        "annotations": {"org.opencontainers.image.ref.name": name},
    }));
    std::fs::write(&path, index.to_string()).unwrap();
    digest
}

/// The manifest descriptor of reference `name` in the layout's `index.json`.
fn layout_entry(dir: &Path, name: &str) -> Value {
    let index: Value =
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {}", dir.display()))
        .clone()
}

fn count_blobs(data: &Path) -> usize {
    data.join("registry/blobs/sha256")
        .read_dir()
        .unwrap()
        .count()
}

/// A multi-platform index and an artifact with a `subject` go through skopeo; a public
/// repository is pulled without credentials; a tenant's quota refuses a push that does not
/// fit; a deleted repository's content is gone after a garbage collection while the rest
/// stays pullable; a deleted tenant's images do not come back with a new tenant of its name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_artifact_public_quota_and_gc_through_real_clients() {
    for t in ["skopeo", "podman", "umoci"] {
        need(t);
    }
    let tmp = tempfile::tempdir().unwrap();
    let layout = tmp.path().join("layout");
    build_busybox(&layout).await;
    let busybox = layout_entry(&layout, "test");
    // A second platform: another architecture in its config, and three layers.
    let arm = format!("{}:arm", layout.display());
    must("umoci", &["new", "--image", &arm], &[]).await;
    must(
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
        &[],
    )
    .await;
    let bundle = tmp.path().join("arm-bundle");
    for layer in 0..3 {
        let b = bundle.to_str().unwrap();
        must("umoci", &["unpack", "--image", &arm, b], &[]).await;
        std::fs::write(
            bundle.join(format!("rootfs/layer-{layer}")),
            format!("{layer}"),
        )
        .unwrap();
        must("umoci", &["repack", "--image", &arm, b], &[]).await;
        std::fs::remove_dir_all(&bundle).unwrap();
    }
    let arm_entry = layout_entry(&layout, "arm");
    let index = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"mediaType": busybox["mediaType"], "digest": busybox["digest"], "size": busybox["size"],
             "platform": {"architecture": "amd64", "os": "linux"}},
            {"mediaType": arm_entry["mediaType"], "digest": arm_entry["digest"], "size": arm_entry["size"],
             "platform": {"architecture": "arm64", "os": "linux"}}]});
    let index_bytes = serde_json::to_vec(&index).unwrap();
    let index_digest = layout_ref(
        &layout,
        "application/vnd.oci.image.index.v1+json",
        &index_bytes,
        "multi",
    );
    // An artifact about the busybox image: empty config, one blob, a subject.
    let empty = layout_blob(&layout, b"{}");
    let sig = layout_blob(&layout, b"a signature, for the test");
    let artifact = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": "application/vnd.hive.test.signature",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2},
        "layers": [{"mediaType": "application/vnd.hive.test.signature", "digest": sig, "size": 25}],
        "subject": {"mediaType": busybox["mediaType"], "digest": busybox["digest"], "size": busybox["size"]}});
    let artifact_bytes = serde_json::to_vec(&artifact).unwrap();
    let artifact_digest = layout_ref(
        &layout,
        "application/vnd.oci.image.manifest.v1+json",
        &artifact_bytes,
        "sig",
    );

    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let srv = start(&data).await;
    let auth_file = tmp.path().join("auth.json");
    std::fs::write(&auth_file, "{}").unwrap(); // no credentials: anonymous unless given
    let env: [(&str, &Path); 1] = [("REGISTRY_AUTH_FILE", &auth_file)];
    let reg = srv.addr.clone();
    let creds = format!("x:{}", srv.acme_member);
    let copy = |src: String, dst: String, extra: Vec<String>| async move {
        let mut a: Vec<String> = vec!["copy".into(), "--quiet".into()];
        a.extend(extra);
        a.extend([src, dst]);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        run("skopeo", &a, &env).await
    };
    let push_creds = vec![
        "--dest-tls-verify=false".to_owned(),
        "--dest-creds".to_owned(),
        creds.clone(),
    ];
    let pull_creds = vec![
        "--src-tls-verify=false".to_owned(),
        "--src-creds".to_owned(),
        creds.clone(),
    ];

    // The index, every platform: pulled back byte-identical.
    let multi = format!("docker://{reg}/acme/multi:1");
    let mut all = push_creds.clone();
    all.push("--all".into());
    let o = copy(
        format!("oci:{}:multi", layout.display()),
        multi.clone(),
        all,
    )
    .await;
    assert!(o.ok, "push index: {}", o.stderr);
    let back = tmp.path().join("back");
    let mut all = pull_creds.clone();
    all.push("--all".into());
    let o = copy(multi.clone(), format!("oci:{}:multi", back.display()), all).await;
    assert!(o.ok, "pull index: {}", o.stderr);
    assert_eq!(
        layout_entry(&back, "multi")["digest"],
        index_digest.as_str()
    );
    for m in [&busybox, &arm_entry] {
        let hex = m["digest"]
            .as_str()
            .unwrap()
            .strip_prefix("sha256:")
            .unwrap();
        assert!(
            back.join("blobs/sha256").join(hex).exists(),
            "platform {hex} missing"
        );
    }

    // The busybox image and its artifact; the referrers API finds the artifact.
    let app = format!("docker://{reg}/acme/app");
    let o = copy(
        format!("oci:{}:test", layout.display()),
        format!("{app}:1"),
        push_creds.clone(),
    )
    .await;
    assert!(o.ok, "push image: {}", o.stderr);
    let o = copy(
        format!("oci:{}:sig", layout.display()),
        format!("{app}:sig"),
        push_creds.clone(),
    )
    .await;
    assert!(o.ok, "push artifact: {}", o.stderr);
    let subject = busybox["digest"].as_str().unwrap();
    let (status, referrers) = srv
        .api(
            Method::GET,
            &format!(
                "/v2/acme/app/referrers/{subject}?artifactType=application/vnd.hive.test.signature"
            ),
            &srv.acme_viewer,
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        referrers["manifests"][0]["digest"],
        artifact_digest.as_str(),
        "{referrers}"
    );
    assert_eq!(referrers["manifests"].as_array().unwrap().len(), 1);
    let back_sig = tmp.path().join("back-sig");
    let o = copy(
        format!("{app}:sig"),
        format!("oci:{}:sig", back_sig.display()),
        pull_creds.clone(),
    )
    .await;
    assert!(o.ok, "pull artifact: {}", o.stderr);
    assert_eq!(
        layout_entry(&back_sig, "sig")["digest"],
        artifact_digest.as_str()
    );

    // The API lists both repositories with their tags; usage counts shared blobs once.
    let (status, list) = srv
        .api(
            Method::GET,
            "/api/v1/tenants/acme/images",
            &srv.acme_viewer,
            None,
        )
        .await;
    assert_eq!(status, 200, "{list}");
    let names: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["acme/app", "acme/multi"]);
    let sizes: u64 = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["size_bytes"].as_u64().unwrap())
        .sum();
    let usage = list["usage_bytes"].as_u64().unwrap();
    assert!(
        usage > 0 && usage < sizes,
        "busybox's blobs are in both: usage {usage}, sizes {sizes}"
    );

    // Public: anyone pulls without credentials (skopeo and podman); private again: refused.
    let o = copy(
        format!("{app}:1"),
        format!("oci:{}/anon:x", tmp.path().display()),
        vec!["--src-tls-verify=false".into(), "--src-no-creds".into()],
    )
    .await;
    assert!(!o.ok, "anonymous pull of a private repository succeeded");
    let (status, repo) = srv
        .api(
            Method::PATCH,
            "/api/v1/tenants/acme/images/app",
            &srv.acme_member,
            Some(json!({"public": true})),
        )
        .await;
    assert_eq!(
        (status, repo["public"].as_bool()),
        (200, Some(true)),
        "{repo}"
    );
    let (status, _) = srv
        .api(
            Method::PATCH,
            "/api/v1/tenants/acme/images/app",
            &srv.other_member,
            Some(json!({"public": false})),
        )
        .await;
    assert_eq!(status, 404, "another tenant changed acme's repository");
    let o = copy(
        format!("{app}:1"),
        format!("oci:{}/anon:x", tmp.path().display()),
        vec!["--src-tls-verify=false".into(), "--src-no-creds".into()],
    )
    .await;
    assert!(o.ok, "anonymous pull of a public repository: {}", o.stderr);
    let pod = |args: &[&str]| podman_args(tmp.path(), args);
    let args = pod(&[
        "pull",
        "-q",
        "--tls-verify=false",
        &format!("{reg}/acme/app:1"),
    ]);
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = run("podman", &a, &env).await;
    assert!(
        o.ok,
        "anonymous podman pull of a public repository: {}",
        o.stderr
    );
    let o = copy(
        format!("oci:{}:test", layout.display()),
        format!("{app}:anon"),
        vec!["--dest-tls-verify=false".into(), "--dest-no-creds".into()],
    )
    .await;
    assert!(!o.ok, "anonymous push to a public repository succeeded");

    // Quota: tenant other may hold 64 KiB; busybox does not fit; nothing is kept.
    let (status, _) = srv
        .api(
            Method::PUT,
            "/api/v1/tenants/other",
            &srv.admin,
            Some(json!({"name": "other", "quota": {"registry_bytes": 65536}})),
        )
        .await;
    assert_eq!(status, 200);
    let before = count_blobs(&data);
    let o = copy(
        format!("oci:{}:test", layout.display()),
        format!("docker://{reg}/other/big:1"),
        vec![
            "--dest-tls-verify=false".into(),
            "--dest-creds".into(),
            format!("x:{}", srv.other_member),
        ],
    )
    .await;
    assert!(
        !o.ok && o.stderr.contains("quota"),
        "push over quota: {}",
        o.stderr
    );
    let (_, list) = srv
        .api(
            Method::GET,
            "/api/v1/tenants/other/images",
            &srv.other_member,
            None,
        )
        .await;
    assert_eq!(list["quota_bytes"], 65536);
    assert!(list["usage_bytes"].as_u64().unwrap() <= 65536, "{list}");
    assert!(
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["tags"].as_array().unwrap().is_empty()),
        "{list}"
    );

    // Delete the index's repository and collect: its own blobs go, busybox's stay.
    let (status, _) = srv
        .api(
            Method::DELETE,
            "/api/v1/tenants/acme/images/multi",
            &srv.acme_member,
            None,
        )
        .await;
    assert_eq!(status, 200);
    let (status, report) = srv
        .api(
            Method::POST,
            "/api/v1/registry/gc?grace_seconds=0",
            &srv.admin,
            None,
        )
        .await;
    assert_eq!(status, 200, "{report}");
    assert!(
        report["deleted"].as_u64().unwrap() >= 2,
        "index and arm manifest: {report}"
    );
    assert!(count_blobs(&data) <= before, "{report}");
    let (status, _) = srv
        .api(Method::POST, "/api/v1/registry/gc", &srv.acme_member, None)
        .await;
    assert_eq!(status, 403, "a tenant collected the registry");
    let back2 = tmp.path().join("back2");
    let o = copy(
        format!("{app}:1"),
        format!("oci:{}:x", back2.display()),
        pull_creds.clone(),
    )
    .await;
    assert!(o.ok, "pull after gc: {}", o.stderr);
    assert_eq!(layout_entry(&back2, "x")["digest"], busybox["digest"]);
    let o = copy(
        multi.clone(),
        format!("oci:{}:m", back2.display()),
        pull_creds.clone(),
    )
    .await;
    assert!(!o.ok, "the deleted repository is still pullable");

    // A deleted tenant's images do not come back with a new tenant of the same name.
    let (status, _) = srv
        .api(Method::DELETE, "/api/v1/tenants/acme", &srv.admin, None)
        .await;
    assert_eq!(status, 200);
    let (status, _) = srv
        .api(
            Method::POST,
            "/api/v1/tenants",
            &srv.admin,
            Some(json!({"name": "acme"})),
        )
        .await;
    assert_eq!(status, 201);
    let (_, list) = srv
        .api(Method::GET, "/api/v1/tenants/acme/images", &srv.admin, None)
        .await;
    assert_eq!(list["items"], json!([]), "{list}");
    assert_eq!(list["usage_bytes"], 0);
    srv.stop().await;
}
