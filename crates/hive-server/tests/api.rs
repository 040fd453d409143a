//! In-process tests of every route and error, through the real router and a real embedded
//! store in a temporary directory (no sockets: `tower::ServiceExt::oneshot`).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode, header};
use hive_server::{AppState, Bootstrap, RateLimit, ServerConfig};
use hive_store::{RedbStore, Store};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

struct Harness {
    app: Router,
    admin: String,
    store: Arc<dyn Store>,
    _dir: tempfile::TempDir,
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
}

impl Reply {
    fn code(&self) -> &str {
        self.body["code"].as_str().unwrap_or("")
    }
    fn message(&self) -> &str {
        self.body["message"].as_str().unwrap_or("")
    }
}

async fn harness_with(config: impl FnOnce(&mut ServerConfig)) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> =
        Arc::new(RedbStore::open(dir.path().join("state.redb"), Default::default()).unwrap());
    let created = hive_server::bootstrap(&store, dir.path()).await.unwrap();
    assert!(matches!(created, Bootstrap::Created { .. }));
    let admin = std::fs::read_to_string(dir.path().join("admin.token"))
        .unwrap()
        .trim()
        .to_owned();
    let mut cfg = ServerConfig {
        data_dir: dir.path().to_owned(),
        rate_limit: RateLimit {
            per_sec: 0.0,
            burst: 0.0,
        },
        bookmark_interval: Duration::from_millis(200),
        ..Default::default()
    };
    config(&mut cfg);
    let app = hive_server::router(AppState::new(store.clone(), cfg));
    Harness {
        app,
        admin,
        store,
        _dir: dir,
    }
}

async fn harness() -> Harness {
    harness_with(|_| {}).await
}

impl Harness {
    async fn raw(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> Reply {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(t) = token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        if let Some(ct) = content_type {
            req = req.header(header::CONTENT_TYPE, ct);
        }
        let resp = self
            .app
            .clone()
            .oneshot(req.body(Body::from(body)).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let body = serde_json::from_slice(&bytes)
            .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into()));
        Reply {
            status,
            headers,
            body,
        }
    }

    async fn call(&self, method: Method, path: &str, token: &str, body: Option<Value>) -> Reply {
        let (ct, bytes) = match body {
            Some(b) => (Some("application/json"), serde_json::to_vec(&b).unwrap()),
            None => (None, Vec::new()),
        };
        self.raw(method, path, Some(token), ct, bytes).await
    }

    async fn ok(&self, method: Method, path: &str, token: &str, body: Option<Value>) -> Value {
        let r = self.call(method.clone(), path, token, body).await;
        assert!(
            r.status.is_success(),
            "{method} {path}: {} {}",
            r.status,
            r.body
        );
        r.body
    }

    async fn tenant(&self, name: &str) {
        self.ok(
            Method::POST,
            "/api/v1/tenants",
            &self.admin.clone(),
            Some(json!({"name": name})),
        )
        .await;
    }

    async fn token(&self, tenant: &str, role: &str) -> String {
        let body = self
            .ok(
                Method::POST,
                &format!("/api/v1/tenants/{tenant}/tokens"),
                &self.admin.clone(),
                Some(json!({"name": "t", "role": role})),
            )
            .await;
        body["token"].as_str().unwrap().to_owned()
    }
}

fn service(name: &str) -> Value {
    json!({"name": name, "spec": {"replicas": 2, "template": {"image": "busybox", "args": ["sleep", "1000"]}}})
}

fn svc_path(tenant: &str) -> String {
    format!("/api/v1/tenants/{tenant}/services")
}

#[tokio::test]
async fn bootstrap_writes_a_private_admin_token_once() {
    use std::os::unix::fs::PermissionsExt;
    let h = harness().await;
    let file = h._dir.path().join("admin.token");
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(h.admin.starts_with("hive_") && h.admin.len() == 5 + 64);
    assert_eq!(
        hive_server::bootstrap(&h.store, h._dir.path())
            .await
            .unwrap(),
        Bootstrap::Existing
    );
    assert_eq!(
        std::fs::read_to_string(&file).unwrap().trim(),
        h.admin,
        "second start must not replace the token"
    );
    let who = h.ok(Method::GET, "/api/v1/whoami", &h.admin, None).await;
    assert_eq!(who["role"], "platform-admin");
    // The store keeps only hashes: the secret appears nowhere in it.
    let secret_part = &h.admin[5..];
    for prefix in ["/auth/", "/platform/"] {
        for kv in h.store.list(prefix, None, 0).await.unwrap().kvs {
            assert!(
                !String::from_utf8_lossy(&kv.value).contains(secret_part),
                "{}",
                kv.key
            );
            assert!(!kv.key.contains(secret_part));
        }
    }
}

#[tokio::test]
async fn tenants_tokens_and_services_round_trip() {
    let h = harness().await;
    h.tenant("acme").await;
    let dup = h
        .call(
            Method::POST,
            "/api/v1/tenants",
            &h.admin,
            Some(json!({"name": "acme"})),
        )
        .await;
    assert_eq!(
        (dup.status, dup.code()),
        (StatusCode::CONFLICT, "already_exists")
    );
    let member = h.token("acme", "member").await;
    let created = h
        .ok(
            Method::POST,
            &svc_path("acme"),
            &member,
            Some(service("web")),
        )
        .await;
    assert_eq!(created["tenant"], "acme");
    assert!(created["revision"].as_u64().unwrap() > 0);
    let got = h
        .ok(
            Method::GET,
            &format!("{}/web", svc_path("acme")),
            &member,
            None,
        )
        .await;
    assert_eq!(got, created);
    let list = h.ok(Method::GET, &svc_path("acme"), &member, None).await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1);

    // Update with the right revision; status written by users is ignored.
    let mut upd = got.clone();
    upd["spec"]["replicas"] = json!(5);
    upd["status"] = json!({"replicas": 99, "ready_replicas": 99});
    let updated = h
        .ok(
            Method::PUT,
            &format!("{}/web", svc_path("acme")),
            &member,
            Some(upd),
        )
        .await;
    assert_eq!(updated["spec"]["replicas"], 5);
    assert_eq!(updated["status"]["ready_replicas"], 0);
    assert_eq!(updated["uid"], created["uid"]);
    assert!(updated["revision"].as_u64() > created["revision"].as_u64());

    // Events record what happened, in order.
    let deleted = h
        .ok(
            Method::DELETE,
            &format!("{}/web", svc_path("acme")),
            &member,
            None,
        )
        .await;
    assert_eq!(deleted["name"], "web");
    let events = h
        .ok(Method::GET, "/api/v1/tenants/acme/events", &member, None)
        .await;
    let reasons: Vec<&str> = events["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["reason"].as_str().unwrap())
        .collect();
    assert_eq!(reasons, ["Created", "Scaled", "Deleted"]);
    let gone = h
        .call(
            Method::GET,
            &format!("{}/web", svc_path("acme")),
            &member,
            None,
        )
        .await;
    assert_eq!(
        (gone.status, gone.code()),
        (StatusCode::NOT_FOUND, "not_found")
    );
    assert_eq!(
        gone.message(),
        "service \"web\" not found in tenant \"acme\""
    );
}

#[tokio::test]
async fn pagination_follows_continue() {
    let h = harness().await;
    h.tenant("acme").await;
    for i in 0..7 {
        h.ok(
            Method::POST,
            &svc_path("acme"),
            &h.admin,
            Some(service(&format!("s{i}"))),
        )
        .await;
    }
    let mut names = Vec::new();
    let mut next: Option<String> = None;
    loop {
        let path = match &next {
            Some(c) => format!("{}?limit=3&continue={c}", svc_path("acme")),
            None => format!("{}?limit=3", svc_path("acme")),
        };
        let page = h.ok(Method::GET, &path, &h.admin, None).await;
        names.extend(
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["name"].as_str().unwrap().to_owned()),
        );
        match page["continue"].as_str() {
            Some(c) => next = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(names, (0..7).map(|i| format!("s{i}")).collect::<Vec<_>>());
    for bad in ["limit=0", "limit=1001", "continue=..%2F", "colour=red"] {
        let r = h
            .call(
                Method::GET,
                &format!("{}?{bad}", svc_path("acme")),
                &h.admin,
                None,
            )
            .await;
        assert_eq!(
            (r.status, r.code()),
            (StatusCode::UNPROCESSABLE_ENTITY, "invalid"),
            "{bad}: {}",
            r.body
        );
    }
}

#[tokio::test]
async fn roles_are_enforced_inside_a_tenant() {
    let h = harness().await;
    h.tenant("acme").await;
    let viewer = h.token("acme", "viewer").await;
    let member = h.token("acme", "member").await;
    let tadmin = h.token("acme", "tenant-admin").await;

    let r = h
        .call(
            Method::POST,
            &svc_path("acme"),
            &viewer,
            Some(service("web")),
        )
        .await;
    assert_eq!((r.status, r.code()), (StatusCode::FORBIDDEN, "forbidden"));
    assert!(r.message().contains("viewer"), "{}", r.message());
    h.ok(
        Method::POST,
        &svc_path("acme"),
        &member,
        Some(service("web")),
    )
    .await;
    h.ok(Method::GET, &svc_path("acme"), &viewer, None).await;

    // Tokens: only tenant admins, never above their own role, never platform-admin.
    let r = h
        .call(
            Method::POST,
            "/api/v1/tenants/acme/tokens",
            &member,
            Some(json!({"name": "x"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = h
        .call(
            Method::POST,
            "/api/v1/tenants/acme/tokens",
            &tadmin,
            Some(json!({"name": "x", "role": "platform-admin"})),
        )
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid")
    );
    let made = h
        .ok(
            Method::POST,
            "/api/v1/tenants/acme/tokens",
            &tadmin,
            Some(json!({"name": "ci", "role": "viewer"})),
        )
        .await;
    assert_eq!(made["role"], "viewer");
    assert_eq!(made["tenant"], "acme");
    let listed = h
        .ok(Method::GET, "/api/v1/tenants/acme/tokens", &tadmin, None)
        .await;
    assert!(
        listed["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t.get("token").is_none() && t.get("hash").is_none())
    );

    // Platform-only routes.
    for (m, p, b) in [
        (
            Method::POST,
            "/api/v1/tenants",
            Some(json!({"name": "evil"})),
        ),
        (Method::DELETE, "/api/v1/tenants/acme", None),
        (Method::GET, "/api/v1/nodes", None),
        (Method::GET, "/api/v1/tokens", None),
        (
            Method::PUT,
            "/api/v1/tenants/acme/services/web/status",
            Some(service("web")),
        ),
    ] {
        let r = h.call(m.clone(), p, &tadmin, b).await;
        assert_eq!(
            (r.status, r.code()),
            (StatusCode::FORBIDDEN, "forbidden"),
            "{m} {p}: {}",
            r.body
        );
    }
    // A tenant token lists only its own tenant.
    let tenants = h.ok(Method::GET, "/api/v1/tenants", &viewer, None).await;
    let names: Vec<&str> = tenants["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["acme"]);
}

/// Every tenant-scoped route, as tenant A's most powerful token, against tenant B (which
/// exists and has objects) and against a tenant that does not exist: the same 404 body.
#[tokio::test]
async fn another_tenant_is_indistinguishable_from_a_missing_one() {
    let h = harness().await;
    h.tenant("alpha").await;
    h.tenant("bravo").await;
    let a = h.token("alpha", "tenant-admin").await;
    let b = h.token("bravo", "tenant-admin").await;
    h.ok(Method::POST, &svc_path("bravo"), &b, Some(service("web")))
        .await;
    let b_tokens = h
        .ok(Method::GET, "/api/v1/tenants/bravo/tokens", &b, None)
        .await;
    let b_token_id = b_tokens["items"][0]["id"].as_str().unwrap().to_owned();

    let routes = |t: &str| {
        vec![
            (Method::GET, format!("/api/v1/tenants/{t}"), None),
            (Method::GET, format!("/api/v1/tenants/{t}/services"), None),
            (
                Method::GET,
                format!("/api/v1/tenants/{t}/services?watch=true"),
                None,
            ),
            (
                Method::POST,
                format!("/api/v1/tenants/{t}/services"),
                Some(service("x")),
            ),
            (
                Method::GET,
                format!("/api/v1/tenants/{t}/services/web"),
                None,
            ),
            (
                Method::PUT,
                format!("/api/v1/tenants/{t}/services/web"),
                Some(service("web")),
            ),
            (
                Method::PUT,
                format!("/api/v1/tenants/{t}/services/web/status"),
                Some(service("web")),
            ),
            (
                Method::DELETE,
                format!("/api/v1/tenants/{t}/services/web"),
                None,
            ),
            (Method::GET, format!("/api/v1/tenants/{t}/instances"), None),
            (Method::GET, format!("/api/v1/tenants/{t}/events"), None),
            (
                Method::GET,
                format!("/api/v1/tenants/{t}/events?watch=true&revision=1"),
                None,
            ),
            (Method::GET, format!("/api/v1/tenants/{t}/tokens"), None),
            (
                Method::POST,
                format!("/api/v1/tenants/{t}/tokens"),
                Some(json!({"name": "x"})),
            ),
            (
                Method::DELETE,
                format!("/api/v1/tenants/{t}/tokens/{b_token_id}"),
                None,
            ),
            (Method::DELETE, format!("/api/v1/tenants/{t}"), None),
        ]
    };
    let before = h.store.current_revision().await.unwrap();
    for ((m, p, body), (_, p_missing, body2)) in routes("bravo").into_iter().zip(routes("charlie"))
    {
        let r = h.call(m.clone(), &p, &a, body).await;
        let r2 = h.call(m.clone(), &p_missing, &a, body2).await;
        assert_eq!(
            (r.status, r.code()),
            (StatusCode::NOT_FOUND, "not_found"),
            "{m} {p}: {}",
            r.body
        );
        assert_eq!(r2.status, StatusCode::NOT_FOUND, "{m} {p_missing}");
        assert_eq!(r.message(), "tenant \"bravo\" not found", "{m} {p}");
        assert_eq!(
            r2.message(),
            "tenant \"charlie\" not found",
            "{m} {p_missing}"
        );
    }
    assert_eq!(
        h.store.current_revision().await.unwrap(),
        before,
        "a refused request wrote something"
    );
    // Bravo's service and token are untouched.
    h.ok(Method::GET, &format!("{}/web", svc_path("bravo")), &b, None)
        .await;
}

#[tokio::test]
async fn bad_bodies_get_stable_codes_and_write_nothing() {
    let h = harness_with(|c| c.body_limit_bytes = 64 * 1024).await;
    h.tenant("acme").await;
    let path = svc_path("acme");
    let before = h.store.current_revision().await.unwrap();
    // (content type, body, status, code, text the message must contain)
    type Case<'a> = (Option<&'a str>, Vec<u8>, StatusCode, &'a str, &'a str);
    let cases: Vec<Case> = vec![
        (
            Some("application/json"),
            b"{\"name\": \"web\",".to_vec(),
            StatusCode::BAD_REQUEST,
            "malformed_body",
            "",
        ),
        (
            Some("application/json"),
            b"[]".to_vec(),
            StatusCode::BAD_REQUEST,
            "malformed_body",
            "",
        ),
        (
            Some("application/json"),
            br#"{"name":"web","spec":{"template":{"image":"busybox"}},"extra":1}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "malformed_body",
            "unknown field `extra`",
        ),
        (
            Some("application/json"),
            br#"{"name":"web","spec":{"replicas":"three","template":{"image":"busybox"}}}"#
                .to_vec(),
            StatusCode::BAD_REQUEST,
            "malformed_body",
            "replicas",
        ),
        (
            Some("text/plain"),
            serde_json::to_vec(&service("web")).unwrap(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "",
        ),
        (
            None,
            serde_json::to_vec(&service("web")).unwrap(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "",
        ),
        (
            Some("application/json"),
            {
                let mut s = service("web");
                s["labels"] = json!({"big": "x".repeat(100 * 1024)});
                serde_json::to_vec(&s).unwrap()
            },
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "",
        ),
    ];
    for (ct, body, status, code, contains) in cases {
        let r = h.raw(Method::POST, &path, Some(&h.admin), ct, body).await;
        assert_eq!((r.status, r.code()), (status, code), "{}", r.body);
        assert!(
            r.message().contains(contains),
            "{:?} not in {:?}",
            contains,
            r.message()
        );
        assert_eq!(r.body["request_id"].as_str().unwrap().len(), 16);
        assert_eq!(
            r.headers["x-request-id"],
            r.body["request_id"].as_str().unwrap()
        );
    }
    for (name, why) in [
        ("Web", "lower case"),
        ("a/b", "'/'"),
        ("..", "'.'"),
        ("", "empty"),
        (&"a".repeat(64), "64 characters"),
        ("-web", "start and end"),
    ] {
        let r = h
            .call(Method::POST, &path, &h.admin, Some(service(name)))
            .await;
        assert_eq!(
            (r.status, r.code()),
            (StatusCode::UNPROCESSABLE_ENTITY, "invalid"),
            "{name:?}"
        );
        assert!(
            r.message().starts_with("name: ") && r.message().contains(why),
            "{name:?}: {}",
            r.message()
        );
    }
    let mut s = service("web");
    s["spec"]["template"]["image"] = json!("Not An Image");
    let r = h.call(Method::POST, &path, &h.admin, Some(s)).await;
    assert!(
        r.message().starts_with("spec.template.image: "),
        "{}",
        r.message()
    );
    let r = h
        .call(
            Method::POST,
            "/api/v1/tenants",
            &h.admin,
            Some(json!({"name": "../etc"})),
        )
        .await;
    assert_eq!(r.code(), "invalid");
    // Path tricks never reach another object.
    for p in [
        "/api/v1/tenants/acme/services/..%2Fx",
        "/api/v1/tenants/acme/services/%2e%2e",
        "/api/v1/tenants/..%2Facme/services",
    ] {
        let r = h.call(Method::GET, p, &h.admin, None).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{p}: {}", r.body);
    }
    assert_eq!(
        h.store.current_revision().await.unwrap(),
        before,
        "a refused request wrote something"
    );
    let r = h.call(Method::GET, "/api/v1/nope", &h.admin, None).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::NOT_FOUND, "route_not_found")
    );
    let r = h.call(Method::PATCH, &path, &h.admin, None).await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn stale_revisions_conflict_and_lose_nothing() {
    let h = harness().await;
    h.tenant("acme").await;
    let item = format!("{}/web", svc_path("acme"));
    let v1 = h
        .ok(
            Method::POST,
            &svc_path("acme"),
            &h.admin,
            Some(service("web")),
        )
        .await;
    let mut a = v1.clone();
    a["spec"]["replicas"] = json!(3);
    let v2 = h.ok(Method::PUT, &item, &h.admin, Some(a)).await;
    let mut stale = v1.clone();
    stale["spec"]["replicas"] = json!(9);
    let r = h.call(Method::PUT, &item, &h.admin, Some(stale)).await;
    assert_eq!((r.status, r.code()), (StatusCode::CONFLICT, "conflict"));
    assert!(r.message().contains("stale"), "{}", r.message());
    let now = h.ok(Method::GET, &item, &h.admin, None).await;
    assert_eq!(now["spec"]["replicas"], 3);
    assert_eq!(now["revision"], v2["revision"]);
    let r = h
        .call(
            Method::DELETE,
            &format!("{item}?revision={}", v1["revision"]),
            &h.admin,
            None,
        )
        .await;
    assert_eq!((r.status, r.code()), (StatusCode::CONFLICT, "conflict"));
    let r = h
        .call(Method::PUT, &item, &h.admin, Some(service("other")))
        .await;
    assert_eq!(r.code(), "invalid", "name mismatch: {}", r.body);
    let r = h
        .call(
            Method::PUT,
            &format!("{}/nope", svc_path("acme")),
            &h.admin,
            Some(service("nope")),
        )
        .await;
    assert_eq!(r.code(), "not_found");

    // Concurrent scale-ups from the same read: exactly one wins, the others conflict.
    let base = h.ok(Method::GET, &item, &h.admin, None).await;
    let mut tasks = Vec::new();
    for n in 10..18 {
        let mut body = base.clone();
        body["spec"]["replicas"] = json!(n);
        let app = h.app.clone();
        let token = h.admin.clone();
        let item = item.clone();
        tasks.push(tokio::spawn(async move {
            let req = Request::put(item)
                .header(header::AUTHORIZATION, format!("Bearer {token}"))
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(serde_json::to_vec(&body).unwrap()))
                .unwrap();
            app.oneshot(req).await.unwrap().status()
        }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            StatusCode::OK => ok += 1,
            StatusCode::CONFLICT => {}
            s => panic!("unexpected {s}"),
        }
    }
    assert_eq!(ok, 1);
}

#[tokio::test]
async fn expired_and_revoked_tokens_are_refused() {
    let h = harness().await;
    h.tenant("acme").await;
    let short = h
        .ok(
            Method::POST,
            "/api/v1/tenants/acme/tokens",
            &h.admin,
            Some(json!({"name": "short", "expires_in_secs": 1})),
        )
        .await;
    let secret = short["token"].as_str().unwrap().to_owned();
    h.ok(Method::GET, &svc_path("acme"), &secret, None).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = h.call(Method::GET, &svc_path("acme"), &secret, None).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::UNAUTHORIZED, "token_expired")
    );

    let t = h
        .ok(
            Method::POST,
            "/api/v1/tenants/acme/tokens",
            &h.admin,
            Some(json!({"name": "rev"})),
        )
        .await;
    let secret = t["token"].as_str().unwrap().to_owned();
    h.ok(Method::GET, &svc_path("acme"), &secret, None).await;
    h.ok(
        Method::DELETE,
        &format!("/api/v1/tenants/acme/tokens/{}", t["id"].as_str().unwrap()),
        &h.admin,
        None,
    )
    .await;
    let r = h.call(Method::GET, &svc_path("acme"), &secret, None).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::UNAUTHORIZED, "unauthenticated")
    );

    for bad in [
        "",
        "Bearer",
        "Basic abc",
        "Bearer hive_00",
        "Bearer hive_not_a_token",
    ] {
        let mut req = Request::get("/api/v1/whoami");
        if !bad.is_empty() {
            req = req.header(header::AUTHORIZATION, bad);
        }
        let resp = h
            .app
            .clone()
            .oneshot(req.body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{bad:?}");
    }
}

#[tokio::test]
async fn deleting_a_tenant_removes_everything_and_old_tokens_stay_dead() {
    let h = harness().await;
    h.tenant("acme").await;
    h.tenant("other").await;
    let member = h.token("acme", "member").await;
    let other = h.token("other", "member").await;
    h.ok(
        Method::POST,
        &svc_path("acme"),
        &member,
        Some(service("web")),
    )
    .await;
    h.ok(
        Method::POST,
        &svc_path("other"),
        &other,
        Some(service("web")),
    )
    .await;
    h.ok(Method::DELETE, "/api/v1/tenants/acme", &h.admin, None)
        .await;
    assert!(
        h.store
            .list("/t/acme/", None, 0)
            .await
            .unwrap()
            .kvs
            .is_empty()
    );
    let r = h.call(Method::GET, &svc_path("acme"), &member, None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    // Same name again: a new tenant, empty, and the old token does not come back to life.
    h.tenant("acme").await;
    let list = h.ok(Method::GET, &svc_path("acme"), &h.admin, None).await;
    assert!(list["items"].as_array().unwrap().is_empty());
    let r = h.call(Method::GET, &svc_path("acme"), &member, None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    // The other tenant is untouched.
    h.ok(
        Method::GET,
        &format!("{}/web", svc_path("other")),
        &other,
        None,
    )
    .await;
}

async fn read_lines(body: &mut Body, n: usize) -> Vec<Value> {
    let mut buf = Vec::new();
    let mut out = Vec::new();
    while out.len() < n {
        let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .expect("watch line within 10 s")
            .expect("stream open")
            .unwrap();
        if let Ok(data) = frame.into_data() {
            buf.extend_from_slice(&data);
        }
        while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            out.push(serde_json::from_slice(&line[..pos]).unwrap());
        }
    }
    out
}

#[tokio::test]
async fn watch_streams_changes_resumes_and_reports_compaction() {
    let h = harness().await;
    h.tenant("acme").await;
    let list = h.ok(Method::GET, &svc_path("acme"), &h.admin, None).await;
    let from = list["revision"].as_u64().unwrap();
    let created = h
        .ok(
            Method::POST,
            &svc_path("acme"),
            &h.admin,
            Some(service("web")),
        )
        .await;
    let mut upd = created.clone();
    upd["spec"]["replicas"] = json!(4);
    h.ok(
        Method::PUT,
        &format!("{}/web", svc_path("acme")),
        &h.admin,
        Some(upd),
    )
    .await;
    h.ok(
        Method::DELETE,
        &format!("{}/web", svc_path("acme")),
        &h.admin,
        None,
    )
    .await;

    let req = Request::get(format!("{}?watch=true&revision={from}", svc_path("acme")))
        .header(header::AUTHORIZATION, format!("Bearer {}", h.admin))
        .body(Body::empty())
        .unwrap();
    let resp = h.app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/x-ndjson");
    let lines = read_lines(&mut resp.into_body(), 4).await;
    let types: Vec<&str> = lines.iter().map(|l| l["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["ADDED", "MODIFIED", "DELETED", "BOOKMARK"]);
    assert_eq!(lines[1]["object"]["spec"]["replicas"], 4);
    assert_eq!(lines[2]["object"]["name"], "web");
    let revs: Vec<u64> = lines
        .iter()
        .map(|l| l["revision"].as_u64().unwrap())
        .collect();
    assert!(
        revs[0] > from && revs[0] < revs[1] && revs[1] < revs[2] && revs[3] == revs[2],
        "{revs:?}"
    );

    // Watching from a compacted revision answers 410 revision_compacted.
    let current = h.store.current_revision().await.unwrap();
    h.store.compact(current).await.unwrap();
    let r = h
        .call(
            Method::GET,
            &format!("{}?watch=true&revision={from}", svc_path("acme")),
            &h.admin,
            None,
        )
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::GONE, "revision_compacted"),
        "{}",
        r.body
    );
}

/// Opens a watch of `path` for `token`; answers its body.
async fn open_watch(h: &Harness, path: &str, revision: u64) -> Body {
    let req = Request::get(format!("{path}?watch=true&revision={revision}"))
        .header(header::AUTHORIZATION, format!("Bearer {}", h.admin))
        .body(Body::empty())
        .unwrap();
    let resp = h.app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    resp.into_body()
}

#[tokio::test]
async fn a_watch_marks_the_end_of_its_replay_with_a_bookmark_at_once() {
    // Idle bookmarks an hour apart: any bookmark seen here marks the end of a replay.
    let h = harness_with(|c| c.bookmark_interval = Duration::from_secs(3600)).await;
    h.tenant("acme").await;
    h.tenant("other").await;
    let from = h.ok(Method::GET, &svc_path("acme"), &h.admin, None).await["revision"]
        .as_u64()
        .unwrap();
    let web = h
        .ok(
            Method::POST,
            &svc_path("acme"),
            &h.admin,
            Some(service("web")),
        )
        .await;
    let quiet = web["revision"].as_u64().unwrap();
    // Writes elsewhere move the store on; nothing under acme's services changes.
    for name in ["a", "b", "c"] {
        h.ok(
            Method::POST,
            &svc_path("other"),
            &h.admin,
            Some(service(name)),
        )
        .await;
    }
    let now = h.store.current_revision().await.unwrap();
    assert!(now > quiet);

    // The replayed event, then the mark at the server's revision, without waiting.
    let t0 = std::time::Instant::now();
    let mut body = open_watch(&h, &svc_path("acme"), from).await;
    let lines = read_lines(&mut body, 2).await;
    assert_eq!(
        (
            lines[0]["type"].as_str(),
            lines[0]["object"]["name"].as_str()
        ),
        (Some("ADDED"), Some("web"))
    );
    assert_eq!(lines[1], json!({"type": "BOOKMARK", "revision": now}));
    // Nothing to replay at all: the mark alone, at once.
    let mut idle = open_watch(&h, &svc_path("acme"), quiet).await;
    assert_eq!(
        read_lines(&mut idle, 1).await,
        [json!({"type": "BOOKMARK", "revision": now})]
    );
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "the marks took {:?}",
        t0.elapsed()
    );
    // Then live events, and no second mark.
    h.ok(
        Method::POST,
        &svc_path("acme"),
        &h.admin,
        Some(service("api")),
    )
    .await;
    for body in [&mut body, &mut idle] {
        let live = read_lines(body, 1).await;
        assert_eq!(
            (live[0]["type"].as_str(), live[0]["object"]["name"].as_str()),
            (Some("ADDED"), Some("api"))
        );
    }
}

#[tokio::test]
async fn rate_limit_answers_429_with_retry_after_to_tenant_tokens_only() {
    let h = harness_with(|c| {
        c.rate_limit = RateLimit {
            per_sec: 1.0,
            burst: 3.0,
        }
    })
    .await;
    h.tenant("acme").await;
    let member = h.token("acme", "member").await;
    for _ in 0..3 {
        h.ok(Method::GET, "/api/v1/whoami", &member, None).await;
    }
    let r = h.call(Method::GET, "/api/v1/whoami", &member, None).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::TOO_MANY_REQUESTS, "rate_limited")
    );
    assert_eq!(r.headers[header::RETRY_AFTER], "1");
    // The platform's own identities (controllers, agents, the operator) are not limited.
    for _ in 0..10 {
        h.ok(Method::GET, "/api/v1/whoami", &h.admin, None).await;
    }
}

#[tokio::test]
async fn openapi_document_matches_the_checked_in_file() {
    let generated = hive_server::openapi().to_pretty_json().unwrap() + "\n";
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json");
    if std::env::var_os("HIVE_UPDATE_OPENAPI").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        on_disk == generated,
        "docs/openapi.json differs from the code: run `HIVE_UPDATE_OPENAPI=1 cargo test -p hive-server --test api openapi` and commit it"
    );
    let doc: Value = serde_json::from_str(&generated).unwrap();
    for p in [
        "/api/v1/tenants",
        "/api/v1/tenants/{tenant}/services/{name}",
        "/api/v1/tenants/{tenant}/tokens",
        "/api/v1/nodes/{name}/status",
    ] {
        assert!(doc["paths"].get(p).is_some(), "{p} missing");
    }
    // Served too, without a token.
    let h = harness().await;
    let r = h
        .raw(Method::GET, "/api/v1/openapi.json", None, None, vec![])
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body, doc);
}

fn net_path(tenant: &str) -> String {
    format!("/api/v1/tenants/{tenant}/networks")
}

#[tokio::test]
async fn tenants_get_a_default_network_with_a_vni_of_its_own() {
    let h = harness().await;
    h.tenant("acme").await;
    h.tenant("other").await;
    let a = h
        .ok(
            Method::GET,
            &format!("{}/default", net_path("acme")),
            &h.admin,
            None,
        )
        .await;
    let b = h
        .ok(
            Method::GET,
            &format!("{}/default", net_path("other")),
            &h.admin,
            None,
        )
        .await;
    // The same subnet in both tenants, on different segments.
    assert_eq!(a["spec"]["subnet"], "10.88.0.0/16");
    assert_eq!(b["spec"]["subnet"], "10.88.0.0/16");
    assert_eq!(a["status"]["gateway"], "10.88.0.1");
    let (va, vb) = (
        a["status"]["vni"].as_u64().unwrap(),
        b["status"]["vni"].as_u64().unwrap(),
    );
    assert!(va >= 4096 && vb >= 4096 && va != vb, "{va} {vb}");
    let claim = |v: u64| format!("/platform/vnis/{v}");
    assert!(h.store.get(&claim(va)).await.unwrap().kv.is_some());
    // The tenant's deletion releases its VNI.
    h.ok(Method::DELETE, "/api/v1/tenants/acme", &h.admin, None)
        .await;
    assert!(h.store.get(&claim(va)).await.unwrap().kv.is_none());
    assert!(h.store.get(&claim(vb)).await.unwrap().kv.is_some());
}

#[tokio::test]
async fn networks_refuse_overlaps_bad_subnets_and_changes() {
    let h = harness().await;
    h.tenant("acme").await;
    h.tenant("other").await;
    let admin = h.token("acme", "tenant-admin").await;
    let member = h.token("acme", "member").await;
    let other = h.token("other", "tenant-admin").await;
    let net = |name: &str, subnet: &str| json!({"name": name, "spec": {"subnet": subnet}});
    let made = h
        .ok(
            Method::POST,
            &net_path("acme"),
            &admin,
            Some(net("back", "10.89.0.0/24")),
        )
        .await;
    assert!(made["status"]["vni"].as_u64().unwrap() >= 4096);
    // Another tenant may use the same subnet.
    h.ok(
        Method::POST,
        &net_path("other"),
        &other,
        Some(net("back", "10.89.0.0/24")),
    )
    .await;
    for (subnet, field, words) in [
        ("10.88.1.0/24", "spec.subnet", "overlaps 10.88.0.0/16"),
        ("10.89.0.128/25", "spec.subnet", "overlaps 10.89.0.0/24"),
        ("10.90.0.1/24", "spec.subnet", "host bits set"),
        ("10.90.0.0/33", "spec.subnet", "more than 32"),
        ("banana", "spec.subnet", "not in CIDR notation"),
        ("10.90.0.0/30", "spec.subnet", "too small"),
        ("10.0.0.0/8", "spec.subnet", "too large"),
    ] {
        let r = h
            .call(
                Method::POST,
                &net_path("acme"),
                &admin,
                Some(net("x", subnet)),
            )
            .await;
        assert_eq!(
            (r.status, r.code()),
            (StatusCode::UNPROCESSABLE_ENTITY, "invalid"),
            "{subnet}: {}",
            r.body
        );
        assert!(
            r.message().contains(field) && r.message().contains(words),
            "{subnet}: {}",
            r.message()
        );
    }
    for (bandwidth, field) in [
        (
            json!({"guaranteed_bps": 2_000_000, "max_bps": 1_000_000}),
            "guaranteed_bps",
        ),
        (json!({"max_bps": 10}), "max_bps"),
        (json!({"pps": 0}), "pps"),
    ] {
        let mut svc = service("bw");
        svc["spec"]["template"]["bandwidth"] = bandwidth;
        let r = h
            .call(Method::POST, &svc_path("acme"), &admin, Some(svc))
            .await;
        assert_eq!(r.code(), "invalid", "{}", r.body);
        assert!(
            r.message()
                .starts_with(&format!("spec.template.bandwidth.{field}")),
            "{}",
            r.message()
        );
    }
    let r = h
        .call(
            Method::POST,
            &net_path("acme"),
            &admin,
            Some(json!({"name": "x", "spec": {"subnet": "10.91.0.0/24", "gateway": "10.92.0.1"}})),
        )
        .await;
    assert!(r.message().contains("spec.gateway"), "{}", r.body);
    // A member may not create networks; another tenant's network is not found.
    let r = h
        .call(
            Method::POST,
            &net_path("acme"),
            &member,
            Some(net("y", "10.93.0.0/24")),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = h
        .call(
            Method::GET,
            &format!("{}/back", net_path("other")),
            &admin,
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    // The subnet cannot change; the default network cannot go.
    let mut changed = made.clone();
    changed["spec"]["subnet"] = json!("10.94.0.0/24");
    let r = h
        .call(
            Method::PUT,
            &format!("{}/back", net_path("acme")),
            &admin,
            Some(changed),
        )
        .await;
    assert_eq!(r.code(), "invalid", "{}", r.body);
    let r = h
        .call(
            Method::DELETE,
            &format!("{}/default", net_path("acme")),
            &admin,
            None,
        )
        .await;
    assert_eq!(r.code(), "invalid", "{}", r.body);
    // Nothing of the refused ones was written.
    let list = h.ok(Method::GET, &net_path("acme"), &admin, None).await;
    let names: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["back", "default"]);
}

#[tokio::test]
async fn binding_allocates_addresses_and_deleting_releases_them() {
    let h = harness().await;
    h.tenant("acme").await;
    let admin = h.token("acme", "tenant-admin").await;
    h.ok(
        Method::POST,
        &net_path("acme"),
        &admin,
        Some(json!({"name": "tiny", "spec": {"subnet": "10.50.0.0/29"}})),
    )
    .await;
    let inst_path = "/api/v1/tenants/acme/instances";
    let instance = |name: &str, ip: Option<&str>| {
        let mut t = json!({"image": "busybox", "network": "tiny"});
        if let Some(ip) = ip {
            t["ip"] = json!(ip);
        }
        // What a client says about the network place is ignored.
        json!({"name": name, "spec": {"service": "s", "template": t,
            "network": {"name": "tiny", "vni": 1, "ip": "10.50.0.6", "prefix_len": 29, "gateway": "x", "mac": "x"}}})
    };
    let bind = |name: &str| {
        let name = name.to_owned();
        let h = &h;
        async move {
            let mut i = h
                .ok(Method::GET, &format!("{inst_path}/{name}"), &h.admin, None)
                .await;
            i["spec"]["node"] = json!("n1");
            h.call(
                Method::PUT,
                &format!("{inst_path}/{name}"),
                &h.admin,
                Some(i),
            )
            .await
        }
    };
    let mut ips = Vec::new();
    for i in 0..6 {
        let made = h
            .ok(
                Method::POST,
                inst_path,
                &h.admin,
                Some(instance(&format!("i{i}"), None)),
            )
            .await;
        assert!(made["spec"]["network"].is_null(), "{made}");
        let r = bind(&format!("i{i}")).await;
        if i < 5 {
            assert!(r.status.is_success(), "{}", r.body);
            let n = &r.body["spec"]["network"];
            assert_eq!(
                (
                    n["name"].as_str(),
                    n["prefix_len"].as_u64(),
                    n["gateway"].as_str()
                ),
                (Some("tiny"), Some(29), Some("10.50.0.1"))
            );
            ips.push(n["ip"].as_str().unwrap().to_owned());
            assert_eq!(
                n["mac"].as_str().unwrap(),
                format!("02:48:0a:32:00:{:02x}", i + 2)
            );
        } else {
            // A /29 holds five instances: the sixth is refused, and stays unbound.
            assert_eq!(
                (r.status, r.code()),
                (StatusCode::CONFLICT, "address_exhausted"),
                "{}",
                r.body
            );
            assert!(r.message().contains("10.50.0.0/29"), "{}", r.message());
            let i5 = h
                .ok(Method::GET, &format!("{inst_path}/i5"), &h.admin, None)
                .await;
            assert!(i5["spec"]["node"].is_null());
        }
    }
    assert_eq!(
        ips,
        [
            "10.50.0.2",
            "10.50.0.3",
            "10.50.0.4",
            "10.50.0.5",
            "10.50.0.6"
        ]
    );
    // A fixed address that is held is refused by name.
    h.ok(
        Method::POST,
        inst_path,
        &h.admin,
        Some(instance("fixed", Some("10.50.0.3"))),
    )
    .await;
    let r = bind("fixed").await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::CONFLICT, "address_in_use"),
        "{}",
        r.body
    );
    // The network is in use: it cannot be deleted.
    let r = h
        .call(
            Method::DELETE,
            &format!("{}/tiny", net_path("acme")),
            &admin,
            None,
        )
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::CONFLICT, "conflict"),
        "{}",
        r.body
    );
    assert!(r.message().contains("in use"), "{}", r.message());
    // Deleting an instance releases its address, which the waiting ones can then take.
    h.ok(Method::DELETE, &format!("{inst_path}/i1"), &h.admin, None)
        .await;
    assert!(
        h.store
            .get("/t/acme/ipam/tiny/10.50.0.3")
            .await
            .unwrap()
            .kv
            .is_none()
    );
    let r = bind("fixed").await;
    assert!(r.status.is_success(), "{}", r.body);
    assert_eq!(r.body["spec"]["network"]["ip"], "10.50.0.3");
    // Updates keep the place: it is not the client's to change.
    let mut again = r.body.clone();
    again["spec"]["network"]["ip"] = json!("10.50.0.6");
    let r = h
        .call(
            Method::PUT,
            &format!("{inst_path}/fixed"),
            &h.admin,
            Some(again),
        )
        .await;
    assert_eq!(r.body["spec"]["network"]["ip"], "10.50.0.3", "{}", r.body);
    // Once every instance is gone the network can be deleted, and its VNI is released.
    let vni = h
        .ok(
            Method::GET,
            &format!("{}/tiny", net_path("acme")),
            &admin,
            None,
        )
        .await["status"]["vni"]
        .as_u64()
        .unwrap();
    for i in ["i0", "i2", "i3", "i4", "i5", "fixed"] {
        h.ok(Method::DELETE, &format!("{inst_path}/{i}"), &h.admin, None)
            .await;
    }
    assert!(
        h.store
            .list("/t/acme/ipam/tiny/", None, 0)
            .await
            .unwrap()
            .kvs
            .is_empty()
    );
    h.ok(
        Method::DELETE,
        &format!("{}/tiny", net_path("acme")),
        &admin,
        None,
    )
    .await;
    assert!(
        h.store
            .get(&format!("/platform/vnis/{vni}"))
            .await
            .unwrap()
            .kv
            .is_none()
    );
}

/// Pushes a one-layer image to `repo` through the registry's monolithic uploads.
async fn push_image(h: &Harness, repo: &str, token: &str) {
    use sha2::Digest as _;
    let digest = |b: &[u8]| format!("sha256:{}", hex::encode(sha2::Sha256::digest(b)));
    let config = br#"{"architecture":"amd64","os":"linux"}"#.to_vec();
    let layer = format!("layer of {repo}").into_bytes();
    for blob in [&config, &layer] {
        let uri = format!("/v2/{repo}/blobs/uploads/?digest={}", digest(blob));
        let r = h
            .raw(Method::POST, &uri, Some(token), None, blob.clone())
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    }
    let manifest = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest(&config), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest(&layer), "size": layer.len()}]});
    let r = h
        .raw(
            Method::PUT,
            &format!("/v2/{repo}/manifests/v1"),
            Some(token),
            Some("application/vnd.oci.image.manifest.v1+json"),
            serde_json::to_vec(&manifest).unwrap(),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
}

#[tokio::test]
async fn image_repositories_are_listed_changed_and_deleted_per_tenant() {
    let h = harness().await;
    h.tenant("acme").await;
    h.tenant("other").await;
    let member = h.token("acme", "member").await;
    let viewer = h.token("acme", "viewer").await;
    let stranger = h.token("other", "tenant-admin").await;
    push_image(&h, "acme/tools/app", &member).await;
    push_image(&h, "acme/tools", &member).await;

    let list = h
        .ok(Method::GET, "/api/v1/tenants/acme/images", &viewer, None)
        .await;
    assert_eq!(list["items"][0]["name"], "acme/tools");
    assert_eq!(list["items"][1]["name"], "acme/tools/app");
    assert_eq!(list["items"][1]["tags"][0]["tag"], "v1");
    assert_eq!(list["items"][1]["public"], false);
    assert!(list["quota_bytes"].is_null());
    assert!(list["usage_bytes"].as_u64().unwrap() > 0);
    let one = h
        .ok(
            Method::GET,
            "/api/v1/tenants/acme/images/tools/app",
            &viewer,
            None,
        )
        .await;
    assert_eq!(one, list["items"][1]);

    // Roles, other tenants, bad names and bodies.
    let patch = |token: &str, name: &str, body: Value| {
        let path = format!("/api/v1/tenants/acme/images/{name}");
        let token = token.to_owned();
        let h = &h;
        async move { h.call(Method::PATCH, &path, &token, Some(body)).await }
    };
    let r = patch(&viewer, "tools/app", json!({"public": true})).await;
    assert_eq!((r.status, r.code()), (StatusCode::FORBIDDEN, "forbidden"));
    let r = patch(&stranger, "tools/app", json!({"public": true})).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = patch(&member, "nope", json!({"public": true})).await;
    assert_eq!((r.status, r.code()), (StatusCode::NOT_FOUND, "not_found"));
    let r = patch(&member, "Bad..Name", json!({"public": true})).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.body);
    assert!(
        r.message().contains("invalid repository name"),
        "{}",
        r.body
    );
    let r = patch(&member, "tools/app", json!({"public": true, "colour": 1})).await;
    assert!(
        r.status.is_client_error() && r.message().contains("colour"),
        "{}",
        r.body
    );
    let r = patch(&member, "tools/app", json!({"public": true})).await;
    assert_eq!(
        (r.status, &r.body["public"]),
        (StatusCode::OK, &json!(true))
    );

    // Deleting the parent repository leaves the nested one whole.
    let r = h
        .call(
            Method::DELETE,
            "/api/v1/tenants/acme/images/tools",
            &viewer,
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    h.ok(
        Method::DELETE,
        "/api/v1/tenants/acme/images/tools",
        &member,
        None,
    )
    .await;
    let list = h
        .ok(Method::GET, "/api/v1/tenants/acme/images", &viewer, None)
        .await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list["items"][0]["name"], "acme/tools/app");
    let r = h
        .call(
            Method::DELETE,
            "/api/v1/tenants/acme/images/tools",
            &member,
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = h
        .raw(
            Method::GET,
            "/v2/acme/tools/app/manifests/v1",
            None,
            None,
            vec![],
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "public: pulled without credentials"
    );

    // Garbage collection is the platform admin's; its query is checked.
    let r = h
        .call(Method::POST, "/api/v1/registry/gc", &member, None)
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = h
        .call(
            Method::POST,
            "/api/v1/registry/gc?grace_seconds=-1",
            &h.admin.clone(),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.body);
    let report = h
        .ok(
            Method::POST,
            "/api/v1/registry/gc?grace_seconds=0",
            &h.admin.clone(),
            None,
        )
        .await;
    // The deleted repository's manifest and layer (its config is the nested one's too).
    assert_eq!(
        (&report["deleted"], &report["kept"]),
        (&json!(2), &json!(3)),
        "{report}"
    );
}

#[tokio::test]
async fn rollout_actions_check_roles_tenants_bodies_and_state() {
    let h = harness().await;
    h.tenant("acme").await;
    h.tenant("other").await;
    let viewer = h.token("acme", "viewer").await;
    let member = h.token("acme", "member").await;
    let stranger = h.token("other", "tenant-admin").await;
    let made = h
        .ok(
            Method::POST,
            &svc_path("acme"),
            &member,
            Some(service("web")),
        )
        .await;
    assert_eq!(made["status"]["template_revision"], 1);
    assert_eq!(made["status"]["history"][0]["cause"], "created by t");
    assert_eq!(made["spec"]["strategy"]["rolling"]["max_surge"], "25%");
    let path = "/api/v1/tenants/acme/services/web/rollout";
    let undo = json!({"action": "undo"});

    let r = h
        .call(Method::POST, path, &viewer, Some(undo.clone()))
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    let r = h
        .call(Method::POST, path, &stranger, Some(undo.clone()))
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
    let r = h
        .call(
            Method::POST,
            "/api/v1/tenants/acme/services/nope/rollout",
            &member,
            Some(undo.clone()),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
    for bad in [
        json!({"action": "pause"}),
        json!({"action": "undo", "to": 1}),
        json!({}),
    ] {
        let r = h.call(Method::POST, path, &member, Some(bad.clone())).await;
        assert_eq!(
            (r.status, r.code()),
            (StatusCode::BAD_REQUEST, "malformed_body"),
            "{bad}: {}",
            r.body
        );
    }
    // Nothing before revision 1; nothing to promote or roll back.
    let r = h
        .call(Method::POST, path, &member, Some(undo.clone()))
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    let r = h
        .call(
            Method::POST,
            path,
            &member,
            Some(json!({"action": "promote"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);

    // A template change is revision 2; undo to 1 is revision 3 with revision 1's image.
    let mut svc = h
        .ok(
            Method::GET,
            &format!("{}/web", svc_path("acme")),
            &member,
            None,
        )
        .await;
    svc["spec"]["template"]["image"] = json!("busybox:2");
    let v2 = h
        .ok(
            Method::PUT,
            &format!("{}/web", svc_path("acme")),
            &member,
            Some(svc),
        )
        .await;
    assert_eq!(v2["status"]["template_revision"], 2);
    assert_eq!(v2["status"]["rollout"]["phase"], "progressing");
    let r = h
        .call(
            Method::POST,
            path,
            &member,
            Some(json!({"action": "undo", "to_revision": 9})),
        )
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid")
    );
    assert!(r.message().starts_with("to_revision:"), "{}", r.message());
    let v3 = h
        .ok(
            Method::POST,
            path,
            &member,
            Some(json!({"action": "undo", "to_revision": 1})),
        )
        .await;
    assert_eq!(v3["status"]["template_revision"], 3);
    assert_eq!(v3["spec"]["template"]["image"], "busybox");
    assert_eq!(
        v3["status"]["history"][2]["cause"],
        "undo to revision 1 by t"
    );
    let events = h
        .ok(Method::GET, "/api/v1/tenants/acme/events", &viewer, None)
        .await;
    assert!(
        events["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["reason"] == "RolloutUndone"),
        "{events}"
    );
}

#[tokio::test]
async fn security_groups_name_only_existing_groups_of_their_tenant_and_stay_while_used() {
    let h = harness().await;
    h.tenant("acme").await;
    h.tenant("other").await;
    let admin = h.token("acme", "tenant-admin").await;
    let member = h.token("acme", "member").await;
    let stranger = h.token("other", "tenant-admin").await;
    let groups = "/api/v1/tenants/acme/securitygroups";
    let rule = |g: &str| json!({"protocol": "tcp", "from_port": 80, "group": g});

    // Members may not write groups; bad rules are refused naming the field.
    let r = h
        .call(Method::POST, groups, &member, Some(json!({"name": "db"})))
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = h
        .call(
            Method::POST,
            groups,
            &admin,
            Some(json!({"name": "db", "spec": {"rules": [{"protocol": "tcp", "from_port": 90, "to_port": 80, "cidr": "10.0.0.0/8"}]}})),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.body);
    assert!(r.message().contains("spec.rules[0].to_port"), "{}", r.body);
    // A rule may name the group itself, not a missing one.
    let r = h
        .call(
            Method::POST,
            groups,
            &admin,
            Some(json!({"name": "db", "spec": {"rules": [rule("app")]}})),
        )
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::NOT_FOUND, "not_found"),
        "{}",
        r.body
    );
    assert!(r.message().contains("\"app\""), "{}", r.body);
    h.ok(
        Method::POST,
        groups,
        &admin,
        Some(json!({"name": "db", "spec": {"rules": [rule("db")]}})),
    )
    .await;
    h.ok(Method::POST, groups, &admin, Some(json!({"name": "app"})))
        .await;
    h.ok(
        Method::PUT,
        &format!("{groups}/db"),
        &admin,
        Some(json!({"name": "db", "spec": {"rules": [rule("db"), rule("app")]}})),
    )
    .await;

    // Another tenant: acme's groups are not found, neither to read nor to name.
    let r = h
        .call(Method::GET, &format!("{groups}/db"), &stranger, None)
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = h
        .call(
            Method::POST,
            "/api/v1/tenants/other/securitygroups",
            &stranger,
            Some(json!({"name": "x", "spec": {"rules": [rule("db")]}})),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);

    // A service joins existing groups only.
    let mut svc = service("api");
    svc["spec"]["template"]["security_groups"] = json!(["app", "nope"]);
    let r = h
        .call(Method::POST, &svc_path("acme"), &member, Some(svc.clone()))
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
    svc["spec"]["template"]["security_groups"] = json!(["app"]);
    h.ok(Method::POST, &svc_path("acme"), &member, Some(svc))
        .await;

    // In use: by the service (app) and by db's rule (app); db itself is free.
    for (name, by) in [("app", "service \"api\"")] {
        let r = h
            .call(Method::DELETE, &format!("{groups}/{name}"), &admin, None)
            .await;
        assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
        assert!(r.message().contains(by), "{}", r.body);
    }
    h.ok(
        Method::DELETE,
        &format!("{}/api", svc_path("acme")),
        &member,
        None,
    )
    .await;
    let r = h
        .call(Method::DELETE, &format!("{groups}/app"), &admin, None)
        .await;
    assert!(r.message().contains("security group \"db\""), "{}", r.body);
    h.ok(Method::DELETE, &format!("{groups}/db"), &admin, None)
        .await;
    h.ok(Method::DELETE, &format!("{groups}/app"), &admin, None)
        .await;
}

#[tokio::test]
async fn writes_fenced_to_a_leaders_term_fail_once_the_term_is_over() {
    let h = harness().await;
    h.tenant("acme").await;
    let term = |holder: &str| hive_store::Op::Put {
        key: hive_server::leader::LEADER_KEY.into(),
        value: bytes::Bytes::from(format!("{{\"holder\":\"{holder}\",\"renewals\":0}}")),
    };
    let old = h.store.txn(vec![term("a")]).await.unwrap().revision;
    let fenced = |epoch: &str, name: &str| {
        let body = serde_json::to_vec(&service(name)).unwrap();
        let req = Request::builder()
            .method(Method::POST)
            .uri(svc_path("acme"))
            .header(header::AUTHORIZATION, format!("Bearer {}", h.admin))
            .header(header::CONTENT_TYPE, "application/json")
            .header(hive_server::leader::EPOCH_HEADER, epoch)
            .body(Body::from(body))
            .unwrap();
        let app = h.app.clone();
        async move { app.oneshot(req).await.unwrap().status() }
    };
    assert_eq!(
        fenced(&old.to_string(), "during").await,
        StatusCode::CREATED
    );
    // Another server takes over: writes of the old term fail and write nothing.
    h.store.txn(vec![term("b")]).await.unwrap();
    assert_eq!(
        fenced(&old.to_string(), "after").await,
        StatusCode::CONFLICT
    );
    let r = h
        .call(
            Method::GET,
            &format!("{}/after", svc_path("acme")),
            &h.admin.clone(),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(
        fenced("not-a-number", "bad").await,
        StatusCode::UNPROCESSABLE_ENTITY
    );
}

#[tokio::test]
async fn services_get_a_vip_that_instances_never_get_and_deleting_releases_it() {
    let h = harness().await;
    h.tenant("acme").await;
    let admin = h.token("acme", "tenant-admin").await;
    h.ok(
        Method::POST,
        &net_path("acme"),
        &admin,
        Some(json!({"name": "tiny", "spec": {"subnet": "10.50.0.0/29"}})),
    )
    .await;
    let svcs = svc_path("acme");
    // What a client says about the VIP is ignored.
    let made = h
        .ok(
            Method::POST,
            &svcs,
            &admin,
            Some(json!({"name": "web", "spec": {"replicas": 1, "template": {"image": "busybox", "network": "tiny"}},
                "status": {"vip": "10.50.0.6"}})),
        )
        .await;
    assert_eq!(made["status"]["vip"], "10.50.0.2", "{made}");
    let uid = made["uid"].as_str().unwrap().to_owned();
    let claim = h.store.get("/t/acme/ipam/tiny/10.50.0.2").await.unwrap().kv;
    assert_eq!(claim.unwrap().value, uid.as_bytes());
    // An instance bound to the network gets another address.
    let inst_path = "/api/v1/tenants/acme/instances";
    h.ok(
        Method::POST,
        inst_path,
        &h.admin,
        Some(
            json!({"name": "i0", "spec": {"service": "web", "node": "n1",
            "template": {"image": "busybox", "network": "tiny"}}}),
        ),
    )
    .await;
    let i0 = h
        .ok(Method::GET, &format!("{inst_path}/i0"), &h.admin, None)
        .await;
    assert_eq!(i0["spec"]["network"]["ip"], "10.50.0.3", "{i0}");
    // Spec updates and status writes keep it.
    let mut upd = made.clone();
    upd["revision"] = json!(0);
    upd["spec"]["replicas"] = json!(3);
    upd["status"]["vip"] = json!("10.50.0.5");
    let r = h
        .ok(Method::PUT, &format!("{svcs}/web"), &admin, Some(upd))
        .await;
    assert_eq!(r["status"]["vip"], "10.50.0.2", "{r}");
    let mut st = r.clone();
    st["revision"] = json!(0);
    st["status"]["vip"] = json!("10.50.0.5");
    let r = h
        .ok(
            Method::PUT,
            &format!("{svcs}/web/status"),
            &h.admin,
            Some(st),
        )
        .await;
    assert_eq!(r["status"]["vip"], "10.50.0.2", "{r}");
    // Another network: the VIP moves, the old claim goes in the same write.
    let mut moved = r.clone();
    moved["revision"] = json!(0);
    moved["spec"]["template"]["network"] = json!("default");
    let r = h
        .ok(Method::PUT, &format!("{svcs}/web"), &admin, Some(moved))
        .await;
    assert_eq!(r["status"]["vip"], "10.88.0.2", "{r}");
    assert!(
        h.store
            .get("/t/acme/ipam/tiny/10.50.0.2")
            .await
            .unwrap()
            .kv
            .is_none()
    );
    // A network that does not exist yet: no VIP; once it exists, a spec write (what the
    // service controller sends) gives one.
    let lazy = h
        .ok(
            Method::POST,
            &svcs,
            &admin,
            Some(json!({"name": "lazy", "spec": {"replicas": 0, "template": {"image": "busybox", "network": "later"}}})),
        )
        .await;
    assert!(lazy["status"]["vip"].is_null(), "{lazy}");
    h.ok(
        Method::POST,
        &net_path("acme"),
        &admin,
        Some(json!({"name": "later", "spec": {"subnet": "10.60.0.0/24"}})),
    )
    .await;
    let events_before = h
        .ok(Method::GET, "/api/v1/tenants/acme/events", &admin, None)
        .await["items"]
        .as_array()
        .unwrap()
        .len();
    let r = h
        .ok(Method::PUT, &format!("{svcs}/lazy"), &admin, Some(lazy))
        .await;
    assert_eq!(r["status"]["vip"], "10.60.0.2", "{r}");
    let events_after = h
        .ok(Method::GET, "/api/v1/tenants/acme/events", &admin, None)
        .await["items"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(
        events_before, events_after,
        "an unchanged spec records no event"
    );
    // Deleting releases.
    for s in ["web", "lazy"] {
        h.ok(Method::DELETE, &format!("{svcs}/{s}"), &admin, None)
            .await;
    }
    for key in [
        "/t/acme/ipam/default/10.88.0.2",
        "/t/acme/ipam/later/10.60.0.2",
    ] {
        assert!(h.store.get(key).await.unwrap().kv.is_none(), "{key}");
    }
}

/// Through a watch cache: `Hive-Min-Revision` that is not a revision is refused (422,
/// naming the header); one beyond the store's (a client of a replaced store) is answered at
/// the store's current revision; every answer carries `Hive-Revision`.
#[tokio::test]
async fn min_revision_header_through_the_watch_cache() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> =
        Arc::new(RedbStore::open(dir.path().join("state.redb"), Default::default()).unwrap());
    hive_server::bootstrap(&store, dir.path()).await.unwrap();
    let admin = std::fs::read_to_string(dir.path().join("admin.token"))
        .unwrap()
        .trim()
        .to_owned();
    let cache = Arc::new(
        hive_store::WatchCache::start(store.clone(), Default::default())
            .await
            .unwrap(),
    );
    let app = hive_server::router(AppState::cached(
        cache,
        ServerConfig {
            data_dir: dir.path().to_owned(),
            ..Default::default()
        },
    ));
    let get = |min: &'static str| {
        let req = Request::get("/api/v1/tenants")
            .header(header::AUTHORIZATION, format!("Bearer {admin}"))
            .header("hive-min-revision", min)
            .body(Body::empty())
            .unwrap();
        let app = app.clone();
        async move { app.oneshot(req).await.unwrap() }
    };
    let bad = get("soon").await;
    assert_eq!(bad.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let body: Value =
        serde_json::from_slice(&bad.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(body["code"], "invalid");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("hive-min-revision"),
        "{body}"
    );
    let current = store.current_revision().await.unwrap();
    let far = get("999999999").await;
    assert_eq!(far.status(), StatusCode::OK);
    let seen: u64 = far.headers()["hive-revision"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(seen >= current && seen < 999_999_999, "{seen}");
}
