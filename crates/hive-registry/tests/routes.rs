//! In-process tests of every registry route and error (`tower::ServiceExt::oneshot`, no
//! sockets), with a fake [`RegistryAuth`] and a temporary data directory.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode, header};
use base64::Engine;
use bytes::Bytes;
use hive_registry::{Principal, Registry, RegistryAuth, RegistryConfig, router};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use tower::ServiceExt;

struct Fake;

#[async_trait::async_trait]
impl RegistryAuth for Fake {
    async fn resolve(&self, secret: &str) -> Option<Principal> {
        let p = |tenant: Option<&str>, push| Principal {
            subject: secret.into(),
            tenant: tenant.map(Into::into),
            push,
        };
        match secret {
            "alice" => Some(p(Some("acme"), true)),
            "viewer" => Some(p(Some("acme"), false)),
            "bob" => Some(p(Some("other"), true)),
            "tina" => Some(p(Some("tiny"), true)),
            "admin" => Some(p(None, true)),
            _ => None,
        }
    }

    async fn quota(&self, tenant: &str) -> Option<u64> {
        (tenant == "tiny").then_some(TINY_QUOTA)
    }
}

/// Tenant `tiny`'s registry quota in the fake.
const TINY_QUOTA: u64 = 1000;

struct H {
    app: Router,
    reg: Arc<Registry>,
    dir: Arc<tempfile::TempDir>,
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
    fn code(&self) -> String {
        self.json()["errors"][0]["code"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    }
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

fn harness() -> H {
    let dir = tempfile::tempdir().unwrap();
    let reg = registry_at(dir.path());
    H {
        app: router(reg.clone()),
        reg,
        dir: Arc::new(dir),
    }
}

fn registry_at(root: &std::path::Path) -> Arc<Registry> {
    Arc::new(Registry::new(
        RegistryConfig::new(root.to_owned()),
        Arc::new(Fake),
    ))
}

fn digest(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

impl H {
    /// Another server on the same registry root (its own process state: sessions, usage
    /// counts, in-process locks), as API servers sharing a directory are.
    fn beside(&self) -> H {
        let reg = registry_at(self.dir.path());
        H {
            app: router(reg.clone()),
            reg,
            dir: self.dir.clone(),
        }
    }

    async fn req(
        &self,
        method: Method,
        uri: &str,
        auth: Option<&str>,
        headers: &[(&str, &str)],
        body: impl Into<Body>,
    ) -> Reply {
        let mut b = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::HOST, "reg.test");
        if let Some(a) = auth {
            b = b.header(header::AUTHORIZATION, format!("Bearer {a}"));
        }
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let resp = self
            .app
            .clone()
            .oneshot(b.body(body.into()).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        Reply {
            status,
            headers,
            body,
        }
    }

    async fn push_blob(&self, repo: &str, auth: &str, data: &[u8]) -> String {
        let r = self.try_push_blob(repo, auth, data).await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.json());
        digest(data)
    }

    /// A monolithic blob upload, whatever it answers.
    async fn try_push_blob(&self, repo: &str, auth: &str, data: &[u8]) -> Reply {
        let d = digest(data);
        self.req(
            Method::POST,
            &format!("/v2/{repo}/blobs/uploads/?digest={d}"),
            Some(auth),
            &[],
            data.to_vec(),
        )
        .await
    }

    /// A new upload session's location.
    async fn start_upload(&self, repo: &str, auth: &str) -> String {
        let uri = format!("/v2/{repo}/blobs/uploads/");
        let r = self
            .req(Method::POST, &uri, Some(auth), &[], Body::empty())
            .await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.json());
        r.header("location").to_owned()
    }

    /// The status of a bodiless request.
    async fn status(&self, method: Method, uri: &str, auth: Option<&str>) -> StatusCode {
        self.req(method, uri, auth, &[], Body::empty()).await.status
    }

    /// Pushes a config and one layer, then an OCI manifest tagged `tag`; returns the manifest.
    async fn push_image(&self, repo: &str, auth: &str, tag: &str, seed: &str) -> (String, Vec<u8>) {
        let config = format!("{{\"seed\":\"{seed}\"}}");
        let c = self.push_blob(repo, auth, config.as_bytes()).await;
        let l = self
            .push_blob(repo, auth, format!("layer {seed}").as_bytes())
            .await;
        let m = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": c, "size": config.len()},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": l, "size": 7 + seed.len()}]});
        let body = serde_json::to_vec(&m).unwrap();
        let r = self
            .req(
                Method::PUT,
                &format!("/v2/{repo}/manifests/{tag}"),
                Some(auth),
                &[("content-type", "application/vnd.oci.image.manifest.v1+json")],
                body.clone(),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.json());
        assert_eq!(r.header("docker-content-digest"), digest(&body));
        (digest(&body), body)
    }

    fn files(&self, sub: &str) -> usize {
        std::fs::read_dir(self.dir.path().join(sub))
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

#[tokio::test]
async fn base_and_token_flow() {
    let h = harness();
    let r = h.req(Method::GET, "/v2/", None, &[], Body::empty()).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.code(), "UNAUTHORIZED");
    assert_eq!(
        r.header("www-authenticate"),
        "Bearer realm=\"http://reg.test/v2/token\",service=\"hive-registry\""
    );
    assert_eq!(
        h.req(Method::GET, "/v2/", Some("alice"), &[], Body::empty())
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        h.req(Method::GET, "/v2/", Some("nobody"), &[], Body::empty())
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );

    // Basic credentials: user anything, password a Hive token.
    let basic = base64::engine::general_purpose::STANDARD.encode("whoever:alice");
    let get_token = |scope: &str| {
        Request::builder()
            .uri(format!("/v2/token?service=hive-registry&scope={scope}"))
            .header(header::AUTHORIZATION, format!("Basic {basic}"))
            .body(Body::empty())
            .unwrap()
    };
    let resp = h
        .app
        .clone()
        .oneshot(get_token("repository:acme/app:pull,push"))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let v: Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    let tok = v["token"].as_str().unwrap().to_owned();
    assert_eq!(v["access_token"], v["token"]);
    // The token pushes to the scoped repository...
    h.push_image("acme/app", &tok, "v1", "a").await;
    // ...but not to another of the same tenant: 401 with the scope to ask for.
    let r = h
        .req(
            Method::GET,
            "/v2/acme/else/tags/list",
            Some(&tok),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(
        r.header("www-authenticate")
            .contains("scope=\"repository:acme/else:pull\"")
    );
    // A token asked for another tenant's repository carries nothing for it: NAME_UNKNOWN.
    let resp = h
        .app
        .clone()
        .oneshot(get_token("repository:other/x:pull"))
        .await
        .unwrap();
    let v: Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    let r = h
        .req(
            Method::GET,
            "/v2/other/x/tags/list",
            v["token"].as_str(),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.code(), "NAME_UNKNOWN");
    // Bad credentials.
    let resp = h
        .app
        .clone()
        .oneshot(
            Request::builder()
                .uri("/v2/token?scope=repository:acme/app:pull")
                .header(
                    header::AUTHORIZATION,
                    format!(
                        "Basic {}",
                        base64::engine::general_purpose::STANDARD.encode("u:wrong")
                    ),
                )
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    // A forged registry token.
    let r = h
        .req(
            Method::GET,
            "/v2/acme/app/tags/list",
            Some("hrt.e30.AAAA"),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn blobs_monolithic_range_delete() {
    let h = harness();
    let data = b"hello registry".to_vec();
    let d = h.push_blob("acme/app", "alice", &data).await;
    let r = h
        .req(
            Method::HEAD,
            &format!("/v2/acme/app/blobs/{d}"),
            Some("alice"),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("content-length"), data.len().to_string());
    assert_eq!(r.header("docker-content-digest"), d);
    let r = h
        .req(
            Method::GET,
            &format!("/v2/acme/app/blobs/{d}"),
            Some("viewer"),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(&r.body[..], &data[..]);
    let r = h
        .req(
            Method::GET,
            &format!("/v2/acme/app/blobs/{d}"),
            Some("alice"),
            &[("range", "bytes=6-13")],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(&r.body[..], b"registry");
    assert_eq!(r.header("content-range"), "bytes 6-13/14");
    let r = h
        .req(
            Method::GET,
            &format!("/v2/acme/app/blobs/{d}"),
            Some("alice"),
            &[("range", "bytes=10-99")],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::RANGE_NOT_SATISFIABLE);
    // Content is shared, but another repository cannot read it without a link.
    let r = h
        .req(
            Method::GET,
            &format!("/v2/acme/other/blobs/{d}"),
            Some("alice"),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (StatusCode::NOT_FOUND, "BLOB_UNKNOWN")
    );
    // Pushing it again to another repository stores it once.
    h.push_blob("acme/other", "alice", &data).await;
    assert_eq!(h.files("blobs/sha256"), 1);
    let r = h
        .req(
            Method::DELETE,
            &format!("/v2/acme/app/blobs/{d}"),
            Some("alice"),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let r = h
        .req(
            Method::HEAD,
            &format!("/v2/acme/app/blobs/{d}"),
            Some("alice"),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = h
        .req(
            Method::DELETE,
            &format!("/v2/acme/app/blobs/{d}"),
            Some("viewer"),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.code(), "DENIED");
}

#[tokio::test]
async fn digest_mismatch_keeps_nothing() {
    let h = harness();
    let wrong = digest(b"something else");
    let r = h
        .req(
            Method::POST,
            &format!("/v2/acme/app/blobs/uploads/?digest={wrong}"),
            Some("alice"),
            &[],
            b"data".to_vec(),
        )
        .await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (StatusCode::BAD_REQUEST, "DIGEST_INVALID")
    );
    assert!(
        r.json()["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains(&wrong)
    );
    assert_eq!(h.files("blobs/sha256"), 0);
    assert_eq!(h.files("uploads"), 0);
    let r = h
        .req(
            Method::POST,
            "/v2/acme/app/blobs/uploads/?digest=sha256:xyz",
            Some("alice"),
            &[],
            b"data".to_vec(),
        )
        .await;
    assert_eq!(r.code(), "DIGEST_INVALID");
    assert_eq!(h.files("uploads"), 0);
}

#[tokio::test]
async fn chunked_upload_and_its_errors() {
    let h = harness();
    let r = h
        .req(
            Method::POST,
            "/v2/acme/app/blobs/uploads/",
            Some("alice"),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let loc = r.header("location").to_owned();
    assert!(loc.starts_with("/v2/acme/app/blobs/uploads/"));
    let r = h
        .req(
            Method::PATCH,
            &loc,
            Some("alice"),
            &[("content-range", "0-4"), ("content-length", "5")],
            b"hello".to_vec(),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    assert_eq!(r.header("range"), "0-4");
    // Out of order.
    let r = h
        .req(
            Method::PATCH,
            &loc,
            Some("alice"),
            &[("content-range", "10-14")],
            b"xxxxx".to_vec(),
        )
        .await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (StatusCode::RANGE_NOT_SATISFIABLE, "BLOB_UPLOAD_INVALID")
    );
    // Content-Range disagreeing with the body.
    let r = h
        .req(
            Method::PATCH,
            &loc,
            Some("alice"),
            &[("content-range", "5-9")],
            b"abc".to_vec(),
        )
        .await;
    assert_eq!(r.status, StatusCode::RANGE_NOT_SATISFIABLE);
    let r = h
        .req(
            Method::PATCH,
            &loc,
            Some("alice"),
            &[("content-range", "garbage")],
            b"abc".to_vec(),
        )
        .await;
    assert_eq!(r.status, StatusCode::RANGE_NOT_SATISFIABLE);
    // Truncated: declares more than it carries.
    let r = h
        .req(
            Method::PATCH,
            &loc,
            Some("alice"),
            &[("content-length", "10")],
            b" wor".to_vec(),
        )
        .await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (StatusCode::BAD_REQUEST, "BLOB_UPLOAD_INVALID")
    );
    // None of that was kept.
    let r = h
        .req(Method::GET, &loc, Some("alice"), &[], Body::empty())
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_eq!(r.header("range"), "0-4");
    // Someone else's session id: via another repository, or another tenant.
    let id = loc.rsplit('/').next().unwrap();
    let r = h
        .req(
            Method::PATCH,
            &format!("/v2/acme/else/blobs/uploads/{id}"),
            Some("alice"),
            &[],
            b"x".to_vec(),
        )
        .await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN")
    );
    let r = h
        .req(
            Method::PATCH,
            &format!("/v2/other/x/blobs/uploads/{id}"),
            Some("bob"),
            &[],
            b"x".to_vec(),
        )
        .await;
    assert_eq!(r.code(), "BLOB_UPLOAD_UNKNOWN");
    let r = h
        .req(Method::PATCH, &loc, Some("bob"), &[], b"x".to_vec())
        .await;
    assert_eq!(r.code(), "NAME_UNKNOWN");
    let r = h
        .req(
            Method::PATCH,
            "/v2/acme/app/blobs/uploads/not-a-session",
            Some("alice"),
            &[],
            b"x".to_vec(),
        )
        .await;
    assert_eq!(r.code(), "BLOB_UPLOAD_UNKNOWN");
    // Final chunk with the PUT.
    let d = digest(b"hello world");
    let r = h
        .req(
            Method::PUT,
            &format!("{loc}?digest={d}"),
            Some("alice"),
            &[],
            b" world".to_vec(),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.json());
    assert_eq!(r.header("location"), format!("/v2/acme/app/blobs/{d}"));
    let r = h
        .req(
            Method::GET,
            &format!("/v2/acme/app/blobs/{d}"),
            Some("alice"),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(&r.body[..], b"hello world");
    assert_eq!(h.files("uploads"), 0);
    // PUT without digest, and cancel.
    let r = h
        .req(
            Method::POST,
            "/v2/acme/app/blobs/uploads/",
            Some("alice"),
            &[],
            Body::empty(),
        )
        .await;
    let loc = r.header("location").to_owned();
    let r = h
        .req(Method::PUT, &loc, Some("alice"), &[], Body::empty())
        .await;
    assert_eq!(r.code(), "DIGEST_INVALID");
    let r = h
        .req(Method::DELETE, &loc, Some("alice"), &[], Body::empty())
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = h
        .req(Method::GET, &loc, Some("alice"), &[], Body::empty())
        .await;
    assert_eq!(r.code(), "BLOB_UPLOAD_UNKNOWN");
    // A chunked upload whose digest is wrong leaves nothing.
    let r = h
        .req(
            Method::POST,
            "/v2/acme/app/blobs/uploads/",
            Some("alice"),
            &[],
            Body::empty(),
        )
        .await;
    let loc = r.header("location").to_owned();
    h.req(Method::PATCH, &loc, Some("alice"), &[], b"abc".to_vec())
        .await;
    let r = h
        .req(
            Method::PUT,
            &format!("{loc}?digest={}", digest(b"abd")),
            Some("alice"),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.code(), "DIGEST_INVALID");
    assert_eq!(h.files("uploads"), 0);
    assert_eq!(h.files("blobs/sha256"), 1);
}

#[tokio::test]
async fn uploads_survive_a_restart() {
    let h = harness();
    let r = h
        .req(
            Method::POST,
            "/v2/acme/app/blobs/uploads/",
            Some("alice"),
            &[],
            Body::empty(),
        )
        .await;
    let loc = r.header("location").to_owned();
    h.req(
        Method::PATCH,
        &loc,
        Some("alice"),
        &[],
        b"first half, ".to_vec(),
    )
    .await;
    let h2 = h.beside();
    drop(h);
    let r = h2
        .req(Method::GET, &loc, Some("alice"), &[], Body::empty())
        .await;
    assert_eq!(r.header("range"), "0-11");
    let r = h2
        .req(
            Method::PATCH,
            &loc,
            Some("alice"),
            &[("content-range", "12-22")],
            b"second half".to_vec(),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let d = digest(b"first half, second half");
    let r = h2
        .req(
            Method::PUT,
            &format!("{loc}?digest={d}"),
            Some("alice"),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.json());
}

#[tokio::test]
async fn expired_uploads_are_refused_and_purged() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = RegistryConfig::new(dir.path().to_owned());
    cfg.upload_ttl = std::time::Duration::ZERO;
    let reg = Arc::new(Registry::new(cfg, Arc::new(Fake)));
    let h = H {
        app: router(reg.clone()),
        reg,
        dir: Arc::new(dir),
    };
    let r = h
        .req(
            Method::POST,
            "/v2/acme/app/blobs/uploads/",
            Some("alice"),
            &[],
            Body::empty(),
        )
        .await;
    let loc = r.header("location").to_owned();
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let r = h
        .req(Method::PATCH, &loc, Some("alice"), &[], b"x".to_vec())
        .await;
    assert_eq!(r.code(), "BLOB_UPLOAD_UNKNOWN");
    h.req(
        Method::POST,
        "/v2/acme/app/blobs/uploads/",
        Some("alice"),
        &[],
        Body::empty(),
    )
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(h.reg.storage.purge_expired_uploads().await, 1);
    assert_eq!(h.files("uploads"), 0);
}

#[tokio::test]
async fn cross_repository_mount() {
    let h = harness();
    let d = h.push_blob("acme/app", "alice", b"shared layer").await;
    let r = h
        .req(
            Method::POST,
            &format!("/v2/acme/copy/blobs/uploads/?mount={d}&from=acme/app"),
            Some("alice"),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(r.header("location"), format!("/v2/acme/copy/blobs/{d}"));
    // Another tenant cannot mount from acme: it gets a plain upload session instead.
    let r = h
        .req(
            Method::POST,
            &format!("/v2/other/x/blobs/uploads/?mount={d}&from=acme/app"),
            Some("bob"),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let r = h
        .req(
            Method::HEAD,
            &format!("/v2/other/x/blobs/{d}"),
            Some("bob"),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    // Mounting a blob the source does not have also falls back to an upload.
    let missing = digest(b"nope");
    let r = h
        .req(
            Method::POST,
            &format!("/v2/acme/copy/blobs/uploads/?mount={missing}&from=acme/app"),
            Some("alice"),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
}

#[tokio::test]
async fn manifests_by_tag_and_digest() {
    let h = harness();
    let (d, body) = h.push_image("acme/app", "alice", "v1", "a").await;
    for reference in ["v1", d.as_str()] {
        let r = h
            .req(
                Method::GET,
                &format!("/v2/acme/app/manifests/{reference}"),
                Some("viewer"),
                &[],
                Body::empty(),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(&r.body[..], &body[..]);
        assert_eq!(
            r.header("content-type"),
            "application/vnd.oci.image.manifest.v1+json"
        );
        assert_eq!(r.header("docker-content-digest"), d);
        let r = h
            .req(
                Method::HEAD,
                &format!("/v2/acme/app/manifests/{reference}"),
                Some("viewer"),
                &[],
                Body::empty(),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.header("content-length"), body.len().to_string());
        assert!(r.body.is_empty());
    }
    let r = h
        .req(
            Method::GET,
            "/v2/acme/app/manifests/nope",
            Some("alice"),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN")
    );
    let r = h
        .req(
            Method::GET,
            "/v2/acme/none/manifests/v1",
            Some("alice"),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.code(), "NAME_UNKNOWN");
    // By digest, with the right and a wrong digest.
    let r = h
        .req(
            Method::PUT,
            &format!("/v2/acme/app/manifests/{d}"),
            Some("alice"),
            &[("content-type", "application/vnd.oci.image.manifest.v1+json")],
            body.clone(),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let r = h
        .req(
            Method::PUT,
            &format!("/v2/acme/app/manifests/{}", digest(b"x")),
            Some("alice"),
            &[("content-type", "application/vnd.oci.image.manifest.v1+json")],
            body.clone(),
        )
        .await;
    assert_eq!(r.code(), "DIGEST_INVALID");

    // Docker schema 2 manifest and a manifest list; an OCI index.
    let (d2, _) = h.push_image("acme/app", "alice", "v2", "b").await;
    let cfg = h.push_blob("acme/app", "alice", b"{}").await;
    let docker = json!({"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": cfg, "size": 2},
        "layers": []});
    let docker = serde_json::to_vec(&docker).unwrap();
    let r = h
        .req(
            Method::PUT,
            "/v2/acme/app/manifests/docker",
            Some("alice"),
            &[(
                "content-type",
                "application/vnd.docker.distribution.manifest.v2+json",
            )],
            docker.clone(),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.json());
    let r = h
        .req(
            Method::GET,
            "/v2/acme/app/manifests/docker",
            Some("alice"),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(
        r.header("content-type"),
        "application/vnd.docker.distribution.manifest.v2+json"
    );
    for (mt, child_mt) in [
        (
            "application/vnd.docker.distribution.manifest.list.v2+json",
            "application/vnd.docker.distribution.manifest.v2+json",
        ),
        (
            "application/vnd.oci.image.index.v1+json",
            "application/vnd.oci.image.manifest.v1+json",
        ),
    ] {
        let idx = json!({"schemaVersion": 2, "mediaType": mt, "manifests": [
            {"mediaType": child_mt, "digest": d, "size": body.len(), "platform": {"architecture": "amd64", "os": "linux"}},
            {"mediaType": child_mt, "digest": d2, "size": 1}]});
        let r = h
            .req(
                Method::PUT,
                "/v2/acme/app/manifests/multi",
                Some("alice"),
                &[("content-type", mt)],
                serde_json::to_vec(&idx).unwrap(),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.json());
        let r = h
            .req(
                Method::GET,
                "/v2/acme/app/manifests/multi",
                Some("alice"),
                &[],
                Body::empty(),
            )
            .await;
        assert_eq!(r.header("content-type"), mt);
        // An index naming a manifest the repository lacks.
        let bad = json!({"schemaVersion": 2, "mediaType": mt, "manifests": [{"mediaType": child_mt, "digest": digest(b"zz"), "size": 1}]});
        let r = h
            .req(
                Method::PUT,
                "/v2/acme/app/manifests/bad",
                Some("alice"),
                &[("content-type", mt)],
                serde_json::to_vec(&bad).unwrap(),
            )
            .await;
        assert_eq!(r.code(), "MANIFEST_BLOB_UNKNOWN");
    }

    // Delete by tag, then by digest (which also drops the tags pointing to it).
    let r = h
        .req(
            Method::DELETE,
            "/v2/acme/app/manifests/v2",
            Some("alice"),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    assert_eq!(
        h.req(
            Method::GET,
            "/v2/acme/app/manifests/v2",
            Some("alice"),
            &[],
            Body::empty()
        )
        .await
        .code(),
        "MANIFEST_UNKNOWN"
    );
    let r = h
        .req(
            Method::DELETE,
            &format!("/v2/acme/app/manifests/{d}"),
            Some("alice"),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    assert_eq!(
        h.req(
            Method::GET,
            "/v2/acme/app/manifests/v1",
            Some("alice"),
            &[],
            Body::empty()
        )
        .await
        .code(),
        "MANIFEST_UNKNOWN"
    );
    assert_eq!(
        h.req(
            Method::DELETE,
            &format!("/v2/acme/app/manifests/{d}"),
            Some("alice"),
            &[],
            Body::empty()
        )
        .await
        .code(),
        "MANIFEST_UNKNOWN"
    );
    assert_eq!(
        h.req(
            Method::DELETE,
            "/v2/acme/app/manifests/docker",
            Some("viewer"),
            &[],
            Body::empty()
        )
        .await
        .code(),
        "DENIED"
    );
}

#[tokio::test]
async fn bad_manifests_are_refused_and_not_kept() {
    let h = harness();
    let layer = h.push_blob("acme/app", "alice", b"layer").await;
    let oci = "application/vnd.oci.image.manifest.v1+json";
    let good_shape = |cfg: &str| {
        json!({"schemaVersion": 2, "mediaType": oci,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg, "size": 2},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer, "size": 5}]})
    };
    let unknown_blob = serde_json::to_vec(&good_shape(&digest(b"never pushed"))).unwrap();
    let r = h
        .req(
            Method::PUT,
            "/v2/acme/app/manifests/t",
            Some("alice"),
            &[("content-type", oci)],
            unknown_blob,
        )
        .await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (StatusCode::BAD_REQUEST, "MANIFEST_BLOB_UNKNOWN")
    );
    let cases: Vec<(Vec<u8>, &str, &str)> = vec![
        (b"{not json".to_vec(), oci, "MANIFEST_INVALID"),
        (br#"{"schemaVersion":2,"layers":[]}"#.to_vec(), oci, "MANIFEST_INVALID"),
        (br#"{"schemaVersion":2,"config":{"mediaType":"a","digest":"sha256:1","size":1},"layers":[]}"#.to_vec(), oci, "MANIFEST_INVALID"),
        (serde_json::to_vec(&good_shape(&layer)).unwrap(), "application/x-unknown", "MANIFEST_INVALID"),
        (serde_json::to_vec(&json!({"schemaVersion": 1, "name": "x"})).unwrap(), "application/vnd.docker.distribution.manifest.v1+json", "MANIFEST_INVALID"),
    ];
    for (body, ct, code) in cases {
        let r = h
            .req(
                Method::PUT,
                "/v2/acme/app/manifests/t",
                Some("alice"),
                &[("content-type", ct)],
                body,
            )
            .await;
        assert_eq!(r.code(), code, "{:?}", r.json());
    }
    // Over 4 MiB.
    let big = vec![b' '; (4 << 20) + 1];
    let r = h
        .req(
            Method::PUT,
            "/v2/acme/app/manifests/t",
            Some("alice"),
            &[("content-type", oci)],
            big,
        )
        .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(r.code(), "SIZE_INVALID");
    // Invalid tags.
    for tag in [".hidden", "a%2fb", &"x".repeat(129)] {
        let r = h
            .req(
                Method::PUT,
                &format!("/v2/acme/app/manifests/{tag}"),
                Some("alice"),
                &[("content-type", oci)],
                b"{}".to_vec(),
            )
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{tag}");
    }
    // Nothing of it was kept: no tag, and the only blob is the layer.
    let r = h
        .req(
            Method::GET,
            "/v2/acme/app/tags/list",
            Some("alice"),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.json()["tags"], json!([]));
    assert_eq!(h.files("blobs/sha256"), 1);
}

#[tokio::test]
async fn names_outside_the_grammar() {
    let h = harness();
    for path in [
        "/v2/acme/../other/x/manifests/v1",
        "/v2/acme/..%2fother/manifests/v1",
        "/v2/acme%2fapp/manifests/v1",
        "/v2/Acme/app/manifests/v1",
        "/v2/acme/app_/tags/list",
        "/v2/solo/manifests/v1",
    ] {
        let r = h
            .req(Method::GET, path, Some("alice"), &[], Body::empty())
            .await;
        assert_eq!(
            (r.status, r.code().as_str()),
            (StatusCode::BAD_REQUEST, "NAME_INVALID"),
            "{path}"
        );
    }
    let r = h
        .req(
            Method::GET,
            "/v2/acme/app/blobs/sha256:../../etc",
            Some("alice"),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.code(), "DIGEST_INVALID");
    let r = h
        .req(
            Method::PUT,
            "/v2/acme/app/tags/list",
            Some("alice"),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED")
    );
    assert_eq!(h.files("repos"), 0);
}

#[tokio::test]
async fn tags_paginate_with_link() {
    let h = harness();
    for t in ["c", "a", "b", "d"] {
        h.push_image("acme/app", "alice", t, "s").await;
    }
    let r = h
        .req(
            Method::GET,
            "/v2/acme/app/tags/list",
            Some("alice"),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(
        r.json(),
        json!({"name": "acme/app", "tags": ["a", "b", "c", "d"]})
    );
    assert_eq!(r.header("link"), "");
    let r = h
        .req(
            Method::GET,
            "/v2/acme/app/tags/list?n=2",
            Some("alice"),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.json()["tags"], json!(["a", "b"]));
    assert_eq!(
        r.header("link"),
        "</v2/acme/app/tags/list?n=2&last=b>; rel=\"next\""
    );
    let r = h
        .req(
            Method::GET,
            "/v2/acme/app/tags/list?n=2&last=b",
            Some("alice"),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.json()["tags"], json!(["c", "d"]));
    assert_eq!(r.header("link"), "");
    let r = h
        .req(
            Method::GET,
            "/v2/acme/none/tags/list",
            Some("alice"),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.code(), "NAME_UNKNOWN");
}

#[tokio::test]
async fn referrers_with_subject_and_filter() {
    let h = harness();
    let (subject, body) = h.push_image("acme/app", "alice", "v1", "a").await;
    let empty = h.push_blob("acme/app", "alice", b"{}").await;
    for (i, at) in [
        "application/vnd.example.sbom",
        "application/vnd.example.sig",
    ]
    .iter()
    .enumerate()
    {
        let m = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "artifactType": at,
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2},
            "layers": [],
            "subject": {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": subject, "size": body.len()},
            "annotations": {"n": i.to_string()}});
        let mb = serde_json::to_vec(&m).unwrap();
        let r = h
            .req(
                Method::PUT,
                &format!("/v2/acme/app/manifests/{}", digest(&mb)),
                Some("alice"),
                &[("content-type", "application/vnd.oci.image.manifest.v1+json")],
                mb,
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.json());
        assert_eq!(r.header("oci-subject"), subject);
    }
    let r = h
        .req(
            Method::GET,
            &format!("/v2/acme/app/referrers/{subject}"),
            Some("viewer"),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.header("content-type"),
        "application/vnd.oci.image.index.v1+json"
    );
    let v = r.json();
    assert_eq!(v["manifests"].as_array().unwrap().len(), 2);
    let r = h
        .req(
            Method::GET,
            &format!("/v2/acme/app/referrers/{subject}?artifactType=application/vnd.example.sig"),
            Some("alice"),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.header("oci-filters-applied"), "artifactType");
    let v = r.json();
    assert_eq!(v["manifests"].as_array().unwrap().len(), 1);
    assert_eq!(
        v["manifests"][0]["artifactType"],
        "application/vnd.example.sig"
    );
    assert_eq!(v["manifests"][0]["annotations"]["n"], "1");
    let r = h
        .req(
            Method::GET,
            &format!("/v2/acme/app/referrers/{}", digest(b"none")),
            Some("alice"),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.json()["manifests"], json!([]));
}

#[tokio::test]
async fn catalog_is_per_tenant() {
    let h = harness();
    h.push_image("acme/app", "alice", "v1", "a").await;
    h.push_image("acme/team/nested", "alice", "v1", "b").await;
    h.push_image("other/x", "bob", "v1", "c").await;
    let r = h
        .req(
            Method::GET,
            "/v2/_catalog",
            Some("alice"),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(
        r.json(),
        json!({"repositories": ["acme/app", "acme/team/nested"]})
    );
    let r = h
        .req(
            Method::GET,
            "/v2/_catalog?n=1",
            Some("viewer"),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.json(), json!({"repositories": ["acme/app"]}));
    assert_eq!(
        r.header("link"),
        "</v2/_catalog?n=1&last=acme/app>; rel=\"next\""
    );
    let r = h
        .req(
            Method::GET,
            "/v2/_catalog",
            Some("admin"),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.json()["repositories"].as_array().unwrap().len(), 3);
    let r = h
        .req(Method::GET, "/v2/_catalog", None, &[], Body::empty())
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    // An anonymous registry token lists nothing and reads nothing.
    let resp = h
        .app
        .clone()
        .oneshot(
            Request::builder()
                .uri("/v2/token?scope=registry:catalog:*")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let v: Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    let r = h
        .req(
            Method::GET,
            "/v2/_catalog",
            v["token"].as_str(),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.json(), json!({"repositories": []}));
    let r = h
        .req(
            Method::GET,
            "/v2/acme/app/tags/list",
            v["token"].as_str(),
            &[],
            Body::empty(),
        )
        .await;
    // Anonymous callers are asked to log in, whether the repository exists or not.
    assert_eq!(r.code(), "UNAUTHORIZED");
}

#[tokio::test]
async fn other_tenants_repositories_are_unknown() {
    let h = harness();
    let (d, _) = h.push_image("acme/app", "alice", "v1", "a").await;
    let layer = digest(b"layer a");
    for (m, path) in [
        (Method::GET, "/v2/acme/app/manifests/v1".to_owned()),
        (Method::HEAD, format!("/v2/acme/app/manifests/{d}")),
        (Method::GET, format!("/v2/acme/app/blobs/{layer}")),
        (Method::GET, "/v2/acme/app/tags/list".to_owned()),
        (Method::GET, format!("/v2/acme/app/referrers/{d}")),
        (Method::PUT, "/v2/acme/app/manifests/evil".to_owned()),
        (Method::DELETE, format!("/v2/acme/app/manifests/{d}")),
        (Method::POST, "/v2/acme/app/blobs/uploads/".to_owned()),
        (
            Method::POST,
            format!("/v2/acme/app/blobs/uploads/?mount={layer}&from=other/x"),
        ),
    ] {
        let r = h
            .req(m.clone(), &path, Some("bob"), &[], Body::empty())
            .await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{m} {path}");
        if m != Method::HEAD {
            // (a HEAD answer has no body to carry the code)
            assert_eq!(r.code(), "NAME_UNKNOWN", "{m} {path}");
        }
    }
    // A viewer of the tenant reads but may not push: DENIED, not unknown.
    let r = h
        .req(
            Method::POST,
            "/v2/acme/app/blobs/uploads/",
            Some("viewer"),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (StatusCode::FORBIDDEN, "DENIED")
    );
    // Unauthenticated: a challenge naming the scope.
    let r = h
        .req(
            Method::GET,
            "/v2/acme/app/manifests/v1",
            None,
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        r.header("www-authenticate"),
        "Bearer realm=\"http://reg.test/v2/token\",service=\"hive-registry\",scope=\"repository:acme/app:pull\""
    );
    // The platform admin reaches every tenant.
    let r = h
        .req(
            Method::GET,
            "/v2/acme/app/manifests/v1",
            Some("admin"),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
}

#[tokio::test]
async fn concurrent_pushes_of_one_blob_and_one_tag() {
    let h = harness();
    let data = vec![7u8; 300_000];
    let (a, b) = tokio::join!(
        h.push_blob("acme/app", "alice", &data),
        h.push_blob("acme/app", "alice", &data)
    );
    assert_eq!(a, b);
    assert_eq!(h.files("blobs/sha256"), 1);
    let (x, y) = tokio::join!(
        h.push_image("acme/app", "alice", "same", "x"),
        h.push_image("acme/app", "alice", "same", "y")
    );
    let r = h
        .req(
            Method::GET,
            "/v2/acme/app/manifests/same",
            Some("alice"),
            &[],
            Body::empty(),
        )
        .await;
    let got = r.header("docker-content-digest").to_owned();
    assert!(got == x.0 || got == y.0);
    assert_eq!(digest(&r.body), got);
    assert_eq!(h.files("tmp"), 0);
}

#[tokio::test]
async fn quota_refuses_what_does_not_fit_and_keeps_nothing() {
    let h = harness();
    let big = vec![1u8; 600];
    let d = h.push_blob("tiny/a", "tina", &big).await;
    // The same content in a second repository of the tenant costs nothing more.
    h.push_blob("tiny/b", "tina", &big).await;
    assert_eq!(h.reg.storage.tenant_usage("tiny").await.unwrap(), 600);
    // A monolithic upload that does not fit: refused, nothing linked, nothing stored.
    let more = vec![2u8; 500];
    let r = h.try_push_blob("tiny/a", "tina", &more).await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (StatusCode::FORBIDDEN, "DENIED")
    );
    assert!(
        r.json()["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("registry quota")
    );
    let uri = format!("/v2/tiny/a/blobs/{}", digest(&more));
    assert_eq!(
        h.status(Method::HEAD, &uri, Some("tina")).await,
        StatusCode::NOT_FOUND
    );
    assert_eq!(h.files("uploads"), 0);
    // Chunked: the chunks may hold content the tenant already has, so they are only bound
    // by the whole quota as they arrive; completing the upload checks exactly.
    let loc = h.start_upload("tiny/a", "tina").await;
    let r = h
        .req(
            Method::PATCH,
            &loc,
            Some("tina"),
            &[("content-range", "0-499")],
            more.clone(),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let put = format!("{loc}?digest={}", digest(&more));
    let r = h
        .req(Method::PUT, &put, Some("tina"), &[], Body::empty())
        .await;
    assert_eq!(r.code(), "DENIED");
    assert_eq!(
        h.status(Method::HEAD, &uri, Some("tina")).await,
        StatusCode::NOT_FOUND
    );
    assert_eq!(h.files("uploads"), 0, "the refused upload is gone");
    // The same bytes as content tiny holds fit, whatever the room left.
    let loc = h.start_upload("tiny/c", "tina").await;
    let r = h
        .req(
            Method::PATCH,
            &loc,
            Some("tina"),
            &[("content-range", "0-599")],
            big.clone(),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let put = format!("{loc}?digest={d}");
    let r = h
        .req(Method::PUT, &put, Some("tina"), &[], Body::empty())
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.json());
    // A chunk that takes an upload past the whole quota is refused as it arrives, cut back.
    let loc = h.start_upload("tiny/a", "tina").await;
    let r = h
        .req(
            Method::PATCH,
            &loc,
            Some("tina"),
            &[("content-range", "0-299")],
            vec![3u8; 300],
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let r = h
        .req(
            Method::PATCH,
            &loc,
            Some("tina"),
            &[("content-range", "300-1099")],
            vec![3u8; 800],
        )
        .await;
    assert_eq!(r.code(), "DENIED");
    let r = h
        .req(Method::GET, &loc, Some("tina"), &[], Body::empty())
        .await;
    assert_eq!(r.header("range"), "0-299", "the refused chunk is gone");
    // A manifest is content too: one that does not fit is refused and not tagged.
    let config = h.push_blob("tiny/a", "tina", b"{}").await;
    let m = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": 2},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": 600}],
        "annotations": {"pad": "x".repeat(500)}});
    let r = h
        .req(
            Method::PUT,
            "/v2/tiny/a/manifests/v1",
            Some("tina"),
            &[("content-type", "application/vnd.oci.image.manifest.v1+json")],
            serde_json::to_vec(&m).unwrap(),
        )
        .await;
    assert_eq!(r.code(), "DENIED");
    assert_eq!(
        h.status(Method::HEAD, "/v2/tiny/a/manifests/v1", Some("tina"))
            .await,
        StatusCode::NOT_FOUND
    );
    // Deleting frees room: unlinked from all three repositories, the 600 bytes no longer
    // count.
    for repo in ["tiny/a", "tiny/b", "tiny/c"] {
        let uri = format!("/v2/{repo}/blobs/{d}");
        assert_eq!(
            h.status(Method::DELETE, &uri, Some("tina")).await,
            StatusCode::ACCEPTED
        );
    }
    assert_eq!(h.reg.storage.tenant_usage("tiny").await.unwrap(), 2);
    h.push_blob("tiny/a", "tina", &more).await;
    // Other tenants have no quota here, and never count against tiny's.
    h.push_blob("acme/app", "alice", &vec![9u8; 5000]).await;
    assert_eq!(h.reg.storage.tenant_usage("tiny").await.unwrap(), 502);
    // A restart counts again from disk and gets the same figure.
    let again = registry_at(h.dir.path());
    assert_eq!(again.storage.tenant_usage("tiny").await.unwrap(), 502);
}

#[tokio::test]
async fn public_repositories_are_pulled_by_anyone_pushed_by_members() {
    let h = harness();
    let (m, _) = h.push_image("acme/pub", "alice", "v1", "p").await;
    let manifest = "/v2/acme/pub/manifests/v1";
    assert_eq!(
        h.status(Method::GET, manifest, None).await,
        StatusCode::UNAUTHORIZED
    );
    let repo = hive_registry::names::Repo::parse("acme/pub").unwrap();
    h.reg.storage.set_public(&repo, true).await.unwrap();
    // Without credentials, with another tenant's token, and through the token flow.
    assert_eq!(h.status(Method::GET, manifest, None).await, StatusCode::OK);
    assert_eq!(
        h.status(Method::GET, manifest, Some("bob")).await,
        StatusCode::OK
    );
    let r = h
        .req(
            Method::GET,
            "/v2/token?service=hive-registry&scope=repository:acme/pub:pull,push",
            None,
            &[],
            Body::empty(),
        )
        .await;
    let tok = r.json()["token"].as_str().unwrap().to_owned();
    assert_eq!(
        h.status(Method::GET, manifest, Some(&tok)).await,
        StatusCode::OK
    );
    let blob = format!("/v2/acme/pub/blobs/{}", digest(b"layer p"));
    assert_eq!(h.status(Method::GET, &blob, None).await, StatusCode::OK);
    // Pushing stays with acme: anonymous is challenged, the anonymous token does not push,
    // another tenant does not even see a repository to push to.
    let upload = "/v2/acme/pub/blobs/uploads/";
    assert_eq!(
        h.status(Method::POST, upload, None).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        h.status(Method::POST, upload, Some(&tok)).await,
        StatusCode::UNAUTHORIZED
    );
    let r = h
        .req(Method::POST, upload, Some("bob"), &[], Body::empty())
        .await;
    assert_eq!(r.code(), "NAME_UNKNOWN");
    // Another tenant may mount from it; its catalog still lists only its own.
    let r = h
        .req(
            Method::POST,
            &format!(
                "/v2/other/copy/blobs/uploads/?mount={}&from=acme/pub",
                digest(b"layer p")
            ),
            Some("bob"),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let r = h
        .req(Method::GET, "/v2/_catalog", Some("bob"), &[], Body::empty())
        .await;
    assert_eq!(r.json()["repositories"], json!(["other/copy"]));
    // Private again: back to unknown for everyone but acme.
    h.reg.storage.set_public(&repo, false).await.unwrap();
    assert_eq!(
        h.status(Method::GET, manifest, None).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        h.status(Method::GET, manifest, Some("bob")).await,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        h.status(
            Method::GET,
            &format!("/v2/acme/pub/manifests/{m}"),
            Some("alice")
        )
        .await,
        StatusCode::OK
    );
}

#[tokio::test]
async fn referenced_blobs_cannot_be_deleted() {
    let h = harness();
    h.push_image("acme/app", "alice", "v1", "r").await;
    let layer = format!("/v2/acme/app/blobs/{}", digest(b"layer r"));
    let r = h
        .req(Method::DELETE, &layer, Some("alice"), &[], Body::empty())
        .await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (StatusCode::FORBIDDEN, "DENIED")
    );
    assert!(
        r.json()["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("delete the manifest first")
    );
    assert_eq!(
        h.status(Method::GET, &layer, Some("alice")).await,
        StatusCode::OK
    );
    let m = h
        .req(
            Method::HEAD,
            "/v2/acme/app/manifests/v1",
            Some("alice"),
            &[],
            Body::empty(),
        )
        .await;
    let uri = format!(
        "/v2/acme/app/manifests/{}",
        m.header("docker-content-digest")
    );
    assert_eq!(
        h.status(Method::DELETE, &uri, Some("alice")).await,
        StatusCode::ACCEPTED
    );
    assert_eq!(
        h.status(Method::DELETE, &layer, Some("alice")).await,
        StatusCode::ACCEPTED
    );
}

#[tokio::test]
async fn gc_deletes_what_nothing_references() {
    let h = harness();
    let (keep, _) = h.push_image("acme/app", "alice", "keep", "k").await;
    let (gone, _) = h.push_image("acme/app", "alice", "gone", "g").await;
    // The kept image's layer is also in another repository; a loose blob nothing uses.
    h.push_blob("acme/other", "alice", b"layer k").await;
    let loose = h.push_blob("acme/app", "alice", b"loose").await;
    assert_eq!(h.files("blobs/sha256"), 7);
    let uri = format!("/v2/acme/app/manifests/{gone}");
    assert_eq!(
        h.status(Method::DELETE, &uri, Some("alice")).await,
        StatusCode::ACCEPTED
    );

    // Young links are pushes in flight: a grace of an hour keeps the loose blob and the
    // deleted image's layers; only its manifest, which nothing links any more, goes.
    let report = h
        .reg
        .storage
        .gc(std::time::Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!((report.unlinked, report.deleted), (0, 1), "{report:?}");
    assert_eq!(h.files("blobs/sha256"), 6);

    let report = h.reg.storage.gc(std::time::Duration::ZERO).await.unwrap();
    // Unlinked: the loose blob, the deleted image's config and layer, and acme/other's
    // copy of "layer k" (no manifest there uses it).
    assert_eq!(report.unlinked, 4, "{report:?}");
    // Deleted: the deleted image's config and layer, and the loose blob.
    assert_eq!(report.deleted, 3, "{report:?}");
    assert_eq!(h.files("blobs/sha256"), 3);
    let blob = format!("/v2/acme/app/blobs/{loose}");
    assert_eq!(
        h.status(Method::HEAD, &blob, Some("alice")).await,
        StatusCode::NOT_FOUND
    );
    // The kept image is whole.
    for d in [keep.clone(), digest(br#"{"seed":"k"}"#), digest(b"layer k")] {
        let path = if d == keep { "manifests" } else { "blobs" };
        let uri = format!("/v2/acme/app/{path}/{d}");
        assert_eq!(
            h.status(Method::GET, &uri, Some("alice")).await,
            StatusCode::OK,
            "{d}"
        );
    }
    assert_eq!(
        h.reg.storage.tenant_usage("acme").await.unwrap(),
        h.reg
            .storage
            .repositories("acme")
            .await
            .unwrap()
            .iter()
            .map(|r| r.size)
            .sum::<u64>()
    );
}

/// Collections run back to back while pushers delete their images and push the same
/// content again, so that most pushes find their blobs stored but unlinked: exactly the
/// blobs a sweep is about to delete. Every push must still end with every blob readable.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gc_is_safe_while_pushes_run() {
    let h = Arc::new(harness());
    gc_races_pushes(h.clone(), h).await;
}

/// The same race with the collector in another server on the same root: only the file
/// locks order its sweep against the pushes' links.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gc_in_another_server_is_safe_while_pushes_run() {
    let h = Arc::new(harness());
    let other = Arc::new(h.beside());
    gc_races_pushes(other, h).await;
}

async fn gc_races_pushes(collector_server: Arc<H>, h: Arc<H>) {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let collector = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut rounds = 0;
            let mut deleted = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = collector_server
                    .reg
                    .storage
                    .gc(std::time::Duration::from_secs(60))
                    .await
                    .unwrap();
                deleted += r.deleted;
                rounds += 1;
            }
            (rounds, deleted)
        })
    };
    let mut pushers = Vec::new();
    for p in 0..4 {
        let h = h.clone();
        pushers.push(tokio::spawn(async move {
            let repo = format!("acme/gc{p}");
            for i in 0..25 {
                let seed = format!("{p}-{}", i % 3);
                let (m, _) = h.push_image(&repo, "alice", "t", &seed).await;
                for d in [
                    digest(format!("{{\"seed\":\"{seed}\"}}").as_bytes()),
                    digest(format!("layer {seed}").as_bytes()),
                ] {
                    let uri = format!("/v2/{repo}/blobs/{d}");
                    let r = h
                        .req(Method::GET, &uri, Some("alice"), &[], Body::empty())
                        .await;
                    assert_eq!(r.status, StatusCode::OK, "push {i} of {repo}: {d} lost");
                    assert_eq!(digest(&r.body), d);
                }
                // Delete the image and its links: its content is now garbage, until the
                // next push of the same seed links it again.
                let uri = format!("/v2/{repo}/manifests/{m}");
                assert_eq!(
                    h.status(Method::DELETE, &uri, Some("alice")).await,
                    StatusCode::ACCEPTED
                );
                for d in [
                    digest(format!("{{\"seed\":\"{seed}\"}}").as_bytes()),
                    digest(format!("layer {seed}").as_bytes()),
                ] {
                    let uri = format!("/v2/{repo}/blobs/{d}");
                    assert_eq!(
                        h.status(Method::DELETE, &uri, Some("alice")).await,
                        StatusCode::ACCEPTED
                    );
                }
            }
        }));
    }
    for p in pushers {
        p.await.unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (rounds, deleted) = collector.await.unwrap();
    assert!(
        rounds > 1 && deleted > 0,
        "the collector ran {rounds} rounds, deleted {deleted}: it must have raced the pushes"
    );
}

/// Two servers on one root count a tenant's quota together: what one links is counted by
/// the other before it admits more.
#[tokio::test]
async fn quota_holds_across_servers_on_one_root() {
    let a = harness();
    let b = a.beside();
    // Both have counted the tenant (empty) before either pushes.
    assert_eq!(a.reg.storage.tenant_usage("tiny").await.unwrap(), 0);
    assert_eq!(b.reg.storage.tenant_usage("tiny").await.unwrap(), 0);
    let first = vec![b'a'; 600];
    a.push_blob("tiny/app", "tina", &first).await;
    assert_eq!(b.reg.storage.tenant_usage("tiny").await.unwrap(), 600);
    let second = vec![b'b'; 600];
    let r = b.try_push_blob("tiny/app", "tina", &second).await;
    assert_eq!(r.code(), "DENIED", "{:?}", r.json());
    // The same content again through the other server costs nothing and is admitted.
    let r = b.try_push_blob("tiny/other", "tina", &first).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.json());
    // A deletion through one server frees room in the other.
    let d = digest(&first);
    for (h, repo) in [(&a, "tiny/app"), (&b, "tiny/other")] {
        let uri = format!("/v2/{repo}/blobs/{d}");
        assert_eq!(
            h.status(Method::DELETE, &uri, Some("tina")).await,
            StatusCode::ACCEPTED
        );
    }
    assert_eq!(a.reg.storage.tenant_usage("tiny").await.unwrap(), 0);
    let r = a.try_push_blob("tiny/app", "tina", &second).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.json());
}

/// A chunked upload whose requests alternate between two servers on one root (a load
/// balancer in front) arrives whole and verified; a chunk that repeats what the other
/// server already took is refused.
#[tokio::test]
async fn chunked_upload_alternates_between_servers() {
    let a = harness();
    let b = a.beside();
    let loc = a.start_upload("acme/app", "alice").await;
    let parts: [&[u8]; 4] = [b"one ", b"two ", b"three ", b"four"];
    let mut at = 0usize;
    for (i, part) in parts.iter().enumerate() {
        let h = if i % 2 == 0 { &a } else { &b };
        let range = format!("{}-{}", at, at + part.len() - 1);
        let r = h
            .req(
                Method::PATCH,
                &loc,
                Some("alice"),
                &[("content-range", &range)],
                part.to_vec(),
            )
            .await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "chunk {i}: {:?}", r.json());
        at += part.len();
        assert_eq!(r.header("range"), format!("0-{}", at - 1));
        // The other server knows how far the upload got.
        let other = if i % 2 == 0 { &b } else { &a };
        let r = other
            .req(Method::GET, &loc, Some("alice"), &[], Body::empty())
            .await;
        assert_eq!(
            r.header("range"),
            format!("0-{}", at - 1),
            "after chunk {i}"
        );
    }
    // `a` took chunk 2 at offset 8; sending it again from a stale view is refused.
    let r = a
        .req(
            Method::PATCH,
            &loc,
            Some("alice"),
            &[("content-range", "8-13")],
            b"three ".to_vec(),
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::RANGE_NOT_SATISFIABLE,
        "{:?}",
        r.json()
    );
    let d = digest(b"one two three four");
    let r = b
        .req(
            Method::PUT,
            &format!("{loc}?digest={d}"),
            Some("alice"),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.json());
    let r = a
        .req(
            Method::GET,
            &format!("/v2/acme/app/blobs/{d}"),
            Some("alice"),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(&r.body[..], b"one two three four");
}
