//! The `/v2/` HTTP surface: one dispatcher over the raw path (repository names contain `/`),
//! the token endpoint `/v2/token`, the catalog, and the spec's response headers.

use std::io::SeekFrom;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::Registry;
use crate::auth::{self, Action, Claims, Credential, Principal};
use crate::error::{Code, RegistryError, Result};
use crate::manifest::{MAX_MANIFEST, OCI_INDEX};
use crate::names::{Digest, Reference, Repo, Target, parse_path};
use crate::storage::ChunkHeaders;

type Reg = Arc<Registry>;

/// The registry's routes: `/v2/`, `/v2/token`, `/v2/_catalog` and everything under `/v2/`.
pub fn router(reg: Reg) -> Router {
    Router::new()
        .route("/v2", get(base))
        .route("/v2/", get(base))
        .route("/v2/token", get(token))
        .route("/v2/_catalog", get(catalog))
        .route("/v2/{*rest}", any(dispatch))
        .with_state(reg)
}

fn builder(status: StatusCode) -> axum::http::response::Builder {
    Response::builder()
        .status(status)
        .header("Docker-Distribution-API-Version", "registry/2.0")
}

fn finish(b: axum::http::response::Builder, body: Body) -> Response {
    b.body(body)
        .unwrap_or_else(|e| RegistryError::internal("build response", e).into_response())
}

fn query(req: &Request) -> Vec<(String, String)> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            let dec = |s: &str| {
                percent_encoding::percent_decode_str(&s.replace('+', " "))
                    .decode_utf8_lossy()
                    .into_owned()
            };
            (dec(k), dec(v))
        })
        .collect()
}

fn param<'a>(q: &'a [(String, String)], key: &str) -> Option<&'a str> {
    q.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

impl Registry {
    fn realm(&self, headers: &HeaderMap) -> String {
        if let Some(r) = &self.config.realm {
            return r.clone();
        }
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("127.0.0.1");
        format!("http://{host}/v2/token")
    }

    fn unauthorized(&self, headers: &HeaderMap, scope: Option<String>, msg: &str) -> RegistryError {
        let mut e = RegistryError::new(Code::Unauthorized, msg);
        e.challenge = Some(auth::challenge(
            &self.realm(headers),
            &self.config.service,
            scope,
        ));
        e
    }

    /// The caller, whatever it may do; `401` with a challenge when unauthenticated.
    async fn principal(
        &self,
        headers: &HeaderMap,
        scope: Option<String>,
    ) -> Result<(Principal, Option<Claims>)> {
        match auth::credential(headers)
            .map_err(|e| self.unauthorized(headers, scope.clone(), &e.message))?
        {
            Credential::None => Err(self.unauthorized(headers, scope, "authentication required")),
            Credential::Secret(s) => match self.auth.resolve(&s).await {
                Some(p) => Ok((p, None)),
                None => {
                    Err(self.unauthorized(headers, scope, "token is unknown, revoked or expired"))
                }
            },
            Credential::Token(t) => match self.signer.verify(&t) {
                Some(c) => Ok((c.principal.clone(), Some(c))),
                None => {
                    Err(self.unauthorized(headers, scope, "registry token is invalid or expired"))
                }
            },
        }
    }

    /// Allows `action` on `repo`, or answers `401`, `DENIED`, or `NAME_UNKNOWN` for another
    /// tenant's repository.
    async fn authorize(
        &self,
        headers: &HeaderMap,
        repo: &Repo,
        action: Action,
    ) -> Result<Principal> {
        let scope = Some(auth::scope_of(repo, action));
        let public = action == Action::Pull && self.storage.is_public(repo).await;
        if public && matches!(auth::credential(headers), Ok(Credential::None)) {
            return Ok(Principal::anonymous());
        }
        let (p, claims) = self.principal(headers, scope.clone()).await?;
        if let Err(e) = auth::decide(&p, repo, action, public) {
            // Whoever came without credentials is asked for them, not told what exists.
            return Err(match p.is_anonymous() {
                true => self.unauthorized(headers, scope, "authentication required"),
                false => e,
            });
        }
        if let Some(c) = claims.filter(|_| !public) {
            let granted = c
                .access
                .iter()
                .any(|(r, push)| r == repo.as_str() && (action == Action::Pull || *push));
            if !granted {
                return Err(self.unauthorized(
                    headers,
                    scope,
                    "registry token does not cover this repository",
                ));
            }
        }
        Ok(p)
    }
}

async fn base(State(reg): State<Reg>, req: Request) -> Response {
    match reg.principal(req.headers(), None).await {
        Ok(_) => finish(
            builder(StatusCode::OK).header(header::CONTENT_TYPE, "application/json"),
            Body::from("{}"),
        ),
        Err(e) => e.into_response(),
    }
}

/// `GET /v2/token?service=…&scope=repository:<name>:pull,push…`: Basic (password = a Hive
/// API token) or Bearer credentials in, a short-lived token for the granted scopes out.
async fn token(State(reg): State<Reg>, req: Request) -> Response {
    let headers = req.headers();
    let principal = match auth::credential(headers) {
        Ok(Credential::None) => Principal::anonymous(),
        Ok(Credential::Secret(s)) => match reg.auth.resolve(&s).await {
            Some(p) => p,
            None => {
                return RegistryError::new(
                    Code::Unauthorized,
                    "token is unknown, revoked or expired",
                )
                .into_response();
            }
        },
        Ok(Credential::Token(_)) | Err(_) => {
            return RegistryError::new(
                Code::Unauthorized,
                "the token endpoint needs Basic credentials (password: a hive api token)",
            )
            .into_response();
        }
    };
    let mut access = Vec::new();
    for (k, v) in query(&req) {
        if k != "scope" {
            continue;
        }
        for s in v.split(' ') {
            let Some((repo, actions)) = auth::parse_scope(s) else {
                continue;
            };
            let wants_push = actions
                .iter()
                .any(|a| matches!(*a, "push" | "delete" | "*"));
            let public = reg.storage.is_public(&repo).await;
            let can_pull = auth::decide(&principal, &repo, Action::Pull, public).is_ok();
            let can_push = auth::decide(&principal, &repo, Action::Push, false).is_ok();
            if can_pull {
                access.push((repo.to_string(), wants_push && can_push));
            }
        }
    }
    let ttl = reg.config.token_ttl.as_secs();
    let tok = reg.signer.sign(&Claims {
        principal,
        exp: auth::now() + ttl,
        access,
    });
    finish(
        builder(StatusCode::OK).header(header::CONTENT_TYPE, "application/json"),
        Body::from(json!({"token": tok, "access_token": tok, "expires_in": ttl}).to_string()),
    )
}

/// Lists `items` after `last`, at most `n`; the `Link` to the next page when truncated.
fn page(
    items: Vec<String>,
    q: &[(String, String)],
    url: &str,
) -> Result<(Vec<String>, Option<String>)> {
    let n = match param(q, "n") {
        Some(s) => Some(s.parse::<usize>().map_err(|_| {
            RegistryError::new(Code::Unsupported, format!("n={s:?} is not a number"))
        })?),
        None => None,
    };
    let mut items: Vec<String> = match param(q, "last") {
        Some(last) => items.into_iter().filter(|t| t.as_str() > last).collect(),
        None => items,
    };
    let mut link = None;
    if let Some(n) = n
        && items.len() > n
    {
        items.truncate(n);
        if let Some(l) = items.last() {
            link = Some(format!("<{url}?n={n}&last={l}>; rel=\"next\""));
        }
    }
    Ok((items, link))
}

async fn catalog(State(reg): State<Reg>, req: Request) -> Response {
    let scope = Some("registry:catalog:*".to_owned());
    let p = match reg.principal(req.headers(), scope).await {
        Ok((p, _)) => p,
        Err(e) => return e.into_response(),
    };
    let names = reg.storage.catalog(p.tenant.as_deref()).await;
    let (names, link) = match page(names, &query(&req), "/v2/_catalog") {
        Ok(x) => x,
        Err(e) => return e.into_response(),
    };
    let mut b = builder(StatusCode::OK).header(header::CONTENT_TYPE, "application/json");
    if let Some(l) = link {
        b = b.header(header::LINK, l);
    }
    finish(b, Body::from(json!({"repositories": names}).to_string()))
}

async fn dispatch(State(reg): State<Reg>, req: Request) -> Response {
    match handle(reg, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

fn header_str(h: &HeaderMap, name: impl axum::http::header::AsHeaderName) -> Option<&str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

fn chunk_headers(h: &HeaderMap) -> Result<ChunkHeaders> {
    let bad = |v: &str| {
        RegistryError::new(
            Code::RangeInvalid,
            format!("Content-Range {v:?} is not <start>-<end>"),
        )
    };
    let range = match header_str(h, header::CONTENT_RANGE) {
        Some(v) => {
            let s = v
                .trim()
                .trim_start_matches("bytes ")
                .trim_start_matches("bytes=");
            let s = s.split('/').next().unwrap_or(s);
            let (a, b) = s.split_once('-').ok_or_else(|| bad(v))?;
            Some((
                a.parse().map_err(|_| bad(v))?,
                b.parse().map_err(|_| bad(v))?,
            ))
        }
        None => None,
    };
    let length = header_str(h, header::CONTENT_LENGTH).and_then(|v| v.parse().ok());
    Ok(ChunkHeaders { range, length })
}

fn upload_accepted(repo: &Repo, id: &str, size: u64, status: StatusCode) -> Response {
    let range = format!("0-{}", size.saturating_sub(1));
    finish(
        builder(status)
            .header(header::LOCATION, format!("/v2/{repo}/blobs/uploads/{id}"))
            .header(header::RANGE, range)
            .header("Docker-Upload-UUID", id)
            .header(header::CONTENT_LENGTH, "0"),
        Body::empty(),
    )
}

fn blob_created(repo: &Repo, d: &Digest) -> Response {
    finish(
        builder(StatusCode::CREATED)
            .header(header::LOCATION, format!("/v2/{repo}/blobs/{d}"))
            .header("Docker-Content-Digest", d.as_str())
            .header(header::CONTENT_LENGTH, "0"),
        Body::empty(),
    )
}

fn unsupported(method: &Method, path: &str) -> RegistryError {
    RegistryError::new(
        Code::Unsupported,
        format!("{method} is not supported on {path}"),
    )
}

async fn handle(reg: Reg, req: Request) -> Result<Response> {
    let path = req.uri().path().to_owned();
    let rest = path.strip_prefix("/v2/").unwrap_or_default();
    let (repo, target) = parse_path(rest)?;
    let method = req.method().clone();
    let action = match (&target, &method) {
        (Target::Upload(_), _) => Action::Push,
        (_, &Method::GET | &Method::HEAD) => Action::Pull,
        _ => Action::Push,
    };
    let principal = reg.authorize(req.headers(), &repo, action).await?;
    let q = query(&req);
    let st = &reg.storage;
    let quota = match action {
        Action::Push => reg.auth.quota(repo.tenant()).await,
        Action::Pull => None,
    };
    match (target, method) {
        (Target::Blob(d), m @ (Method::GET | Method::HEAD)) => {
            get_blob(&reg, &repo, &d, m == Method::HEAD, req.headers()).await
        }
        (Target::Blob(d), Method::DELETE) => {
            st.delete_blob(&repo, &d).await?;
            Ok(finish(
                builder(StatusCode::ACCEPTED).header(header::CONTENT_LENGTH, "0"),
                Body::empty(),
            ))
        }
        (Target::Upload(None), Method::POST) => {
            if let (Some(m), Some(from)) = (param(&q, "mount"), param(&q, "from")) {
                let d = Digest::parse(m)?;
                let from = Repo::parse(from)?;
                let public = st.is_public(&from).await;
                if auth::decide(&principal, &from, Action::Pull, public).is_ok()
                    && st.mount(&repo, &from, &d, quota).await?
                {
                    return Ok(blob_created(&repo, &d));
                }
            }
            let id = st.start_upload(&repo).await?;
            if let Some(d) = param(&q, "digest") {
                let d = match Digest::parse(d) {
                    Ok(d) => d,
                    Err(e) => {
                        let _ = st.cancel_upload(&repo, &id).await;
                        return Err(e);
                    }
                };
                let h = chunk_headers(req.headers())?;
                let body = req.into_body().into_data_stream();
                if let Err(e) = st
                    .finish(
                        &repo,
                        &id,
                        &d,
                        ChunkHeaders { range: None, ..h },
                        body,
                        quota,
                    )
                    .await
                {
                    let _ = st.cancel_upload(&repo, &id).await;
                    return Err(e);
                }
                return Ok(blob_created(&repo, &d));
            }
            Ok(upload_accepted(&repo, &id, 0, StatusCode::ACCEPTED))
        }
        (Target::Upload(Some(id)), Method::GET) => {
            let size = st.upload_size(&repo, &id).await?;
            Ok(upload_accepted(&repo, &id, size, StatusCode::NO_CONTENT))
        }
        (Target::Upload(Some(id)), Method::PATCH) => {
            let h = chunk_headers(req.headers())?;
            let size = st
                .append(&repo, &id, h, req.into_body().into_data_stream(), quota)
                .await?;
            Ok(upload_accepted(&repo, &id, size, StatusCode::ACCEPTED))
        }
        (Target::Upload(Some(id)), Method::PUT) => {
            let d = param(&q, "digest").ok_or_else(|| {
                RegistryError::new(
                    Code::DigestInvalid,
                    format!("upload {id} to {repo}: PUT needs ?digest="),
                )
            })?;
            let d = Digest::parse(d)?;
            let h = chunk_headers(req.headers())?;
            st.finish(&repo, &id, &d, h, req.into_body().into_data_stream(), quota)
                .await?;
            Ok(blob_created(&repo, &d))
        }
        (Target::Upload(Some(id)), Method::DELETE) => {
            st.cancel_upload(&repo, &id).await?;
            Ok(finish(builder(StatusCode::NO_CONTENT), Body::empty()))
        }
        (Target::Manifest(r), m @ (Method::GET | Method::HEAD)) => {
            let reference = Reference::parse(&r)?;
            let man = st.get_manifest(&repo, &reference).await?;
            let b = builder(StatusCode::OK)
                .header(header::CONTENT_TYPE, &man.media_type)
                .header(header::CONTENT_LENGTH, man.body.len())
                .header("Docker-Content-Digest", man.digest.as_str())
                .header(header::ETAG, format!("\"{}\"", man.digest));
            Ok(finish(
                b,
                if m == Method::HEAD {
                    Body::empty()
                } else {
                    Body::from(man.body)
                },
            ))
        }
        (Target::Manifest(r), Method::PUT) => {
            let reference = Reference::parse(&r)?;
            let ct = header_str(req.headers(), header::CONTENT_TYPE)
                .map(|c| c.split(';').next().unwrap_or(c).trim().to_owned());
            let body = read_limited(req, &format!("{repo}:{r}")).await?;
            let (digest, subject) = st
                .put_manifest(&repo, &reference, ct.as_deref(), body, quota)
                .await?;
            let mut b = builder(StatusCode::CREATED)
                .header(header::LOCATION, format!("/v2/{repo}/manifests/{digest}"))
                .header("Docker-Content-Digest", digest.as_str())
                .header(header::CONTENT_LENGTH, "0");
            if let Some(s) = subject {
                b = b.header("OCI-Subject", s.as_str());
            }
            Ok(finish(b, Body::empty()))
        }
        (Target::Manifest(r), Method::DELETE) => {
            st.delete_manifest(&repo, &Reference::parse(&r)?).await?;
            Ok(finish(
                builder(StatusCode::ACCEPTED).header(header::CONTENT_LENGTH, "0"),
                Body::empty(),
            ))
        }
        (Target::Tags, Method::GET) => {
            let tags = st.tags(&repo).await?;
            let (tags, link) = page(tags, &q, &format!("/v2/{repo}/tags/list"))?;
            let mut b = builder(StatusCode::OK).header(header::CONTENT_TYPE, "application/json");
            if let Some(l) = link {
                b = b.header(header::LINK, l);
            }
            Ok(finish(
                b,
                Body::from(json!({"name": repo.as_str(), "tags": tags}).to_string()),
            ))
        }
        (Target::Referrers(d), Method::GET) => {
            if !st.repo_exists(&repo).await {
                return Err(auth::name_unknown(&repo));
            }
            let mut list = st.referrers(&repo, &d).await?;
            let mut b = builder(StatusCode::OK).header(header::CONTENT_TYPE, OCI_INDEX);
            if let Some(at) = param(&q, "artifactType") {
                list.retain(|m| m["artifactType"].as_str() == Some(at));
                b = b.header("OCI-Filters-Applied", "artifactType");
            }
            let body = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": list});
            Ok(finish(b, Body::from(body.to_string())))
        }
        (_, m) => Err(unsupported(&m, &path)),
    }
}

/// Reads a manifest body, refusing more than [`MAX_MANIFEST`] bytes.
async fn read_limited(req: Request, what: &str) -> Result<Bytes> {
    let too_big = || {
        RegistryError::new(
            Code::TooLarge,
            format!("manifest {what} is larger than {MAX_MANIFEST} bytes"),
        )
    };
    if header_str(req.headers(), header::CONTENT_LENGTH)
        .and_then(|v| v.parse::<usize>().ok())
        .is_some_and(|n| n > MAX_MANIFEST)
    {
        return Err(too_big());
    }
    let mut stream = req.into_body().into_data_stream();
    let mut buf = BytesMut::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            RegistryError::new(
                Code::ManifestInvalid,
                format!("manifest {what}: body broke off: {e}"),
            )
        })?;
        if buf.len() + chunk.len() > MAX_MANIFEST {
            return Err(too_big());
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

/// `bytes=a-b` or `bytes=a-` within `size`.
fn parse_range(v: &str, size: u64) -> Option<(u64, u64)> {
    let (a, b) = v.trim().strip_prefix("bytes=")?.split_once('-')?;
    let a: u64 = a.parse().ok()?;
    let b: u64 = if b.is_empty() {
        size.checked_sub(1)?
    } else {
        b.parse().ok()?
    };
    (a <= b && b < size).then_some((a, b))
}

async fn get_blob(
    reg: &Registry,
    repo: &Repo,
    d: &Digest,
    head: bool,
    headers: &HeaderMap,
) -> Result<Response> {
    let size = reg.storage.blob_size(repo, d).await?.ok_or_else(|| {
        RegistryError::new(
            Code::BlobUnknown,
            format!("blob {d} is unknown to repository {repo}"),
        )
    })?;
    let base = |status| {
        builder(status)
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .header("Docker-Content-Digest", d.as_str())
            .header(header::ACCEPT_RANGES, "bytes")
            .header(header::ETAG, format!("\"{d}\""))
    };
    if head {
        return Ok(finish(
            base(StatusCode::OK).header(header::CONTENT_LENGTH, size),
            Body::empty(),
        ));
    }
    let range = match header_str(headers, header::RANGE) {
        Some(v) => Some(parse_range(v, size).ok_or_else(|| {
            RegistryError::new(
                Code::RangeInvalid,
                format!("range {v:?} is outside blob {d} of {size} bytes"),
            )
        })?),
        None => None,
    };
    let mut file = reg.storage.open_blob(d).await?;
    let (status, start, len) = match range {
        Some((a, b)) => (StatusCode::PARTIAL_CONTENT, a, b - a + 1),
        None => (StatusCode::OK, 0, size),
    };
    if start > 0 {
        file.seek(SeekFrom::Start(start))
            .await
            .map_err(|e| RegistryError::internal(format!("seek blob {d}"), e))?;
    }
    let stream = tokio_util::io::ReaderStream::with_capacity(file.take(len), 1 << 20);
    let mut b = base(status).header(header::CONTENT_LENGTH, len);
    if status == StatusCode::PARTIAL_CONTENT {
        b = b.header(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{size}", start + len - 1),
        );
    }
    Ok(finish(b, Body::from_stream(stream)))
}
