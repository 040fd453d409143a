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
    acme_member: String,
    acme_viewer: String,
    other_member: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
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
    let app = hive_server::router(AppState::new(store.clone(), config.clone()));
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
    let task = tokio::spawn(hive_server::serve(store, config, listener, async move {
        let _ = rx.await;
    }));
    Server {
        addr,
        acme_member,
        acme_viewer,
        other_member,
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
    let mut srv = start(&data).await;
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
    let root = tmp.path().join("podman-root");
    let runroot = tmp.path().join("podman-run");
    let pod = |args: &[&str]| {
        let mut v: Vec<String> = vec![
            "--root".into(),
            root.display().to_string(),
            "--runroot".into(),
            runroot.display().to_string(),
            "--storage-driver".into(),
            "vfs".into(),
        ];
        v.extend(args.iter().map(|s| s.to_string()));
        v
    };
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

    srv.stop.take().map(|s| s.send(()));
    tokio::time::timeout(Duration::from_secs(10), &mut srv.task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
