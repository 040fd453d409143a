//! A typed client of Hive's API.
//!
//! One [`Client`] holds a connection pool, the server's base URL and a bearer token. Its
//! methods follow the API's shape: generic create/get/list/update/delete/watch over every
//! [`Resource`], plus tokens and `whoami`. API errors come back as [`ClientError::Api`] with the
//! server's stable code.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub mod exec;
pub mod reflector;

use bytes::{Buf, BytesMut};
use futures_util::{Stream, StreamExt};
use hive_api::{
    API_PREFIX, ApiErrorBody, ApiToken, CreatedToken, List, Resource, Scope, TokenCreate,
    WatchEvent, WhoAmI,
};
use reqwest::{Method, RequestBuilder, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{method} {url}: {source}")]
    Transport {
        method: Method,
        url: String,
        source: reqwest::Error,
    },
    #[error("{} ({}): {}", .body.message, .body.code, .status)]
    Api {
        status: StatusCode,
        body: ApiErrorBody,
        retry_after: Option<u64>,
    },
    #[error("decode response of {url}: {message}")]
    Decode { url: String, message: String },
    #[error("server URL {0:?} must start with http:// or https://")]
    Url(String),
    #[error("build HTTP client: {0}")]
    Build(reqwest::Error),
}

impl ClientError {
    /// The API error code, if the server answered with one.
    pub fn code(&self) -> Option<hive_api::ErrorCode> {
        match self {
            ClientError::Api { body, .. } => Some(body.code),
            _ => None,
        }
    }
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// Watch events as they arrive; ends when the server closes the stream.
pub type WatchStream<R> = std::pin::Pin<Box<dyn Stream<Item = Result<WatchEvent<R>>> + Send>>;

/// Per-request timeout (watches have none).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Debug)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
    /// The leader's term a controller's writes are fenced to.
    leader_epoch: Option<u64>,
    /// The newest revision the server reported (`Hive-Revision`), shared by clones: every
    /// request asks for a state at least that new (`Hive-Min-Revision`), so what this client
    /// wrote or read it sees again, from whichever server of an HA control plane answers.
    seen: Arc<AtomicU64>,
}

/// The header that carries [`Client::with_leader_epoch`] (the server's `leader::EPOCH_HEADER`).
pub const LEADER_EPOCH_HEADER: &str = "hive-leader-epoch";
/// The revision a request must be answered at or after (the server's `MIN_REVISION_HEADER`).
pub const MIN_REVISION_HEADER: &str = "hive-min-revision";
/// The revision a response is at least as new as (the server's `REVISION_HEADER`).
pub const REVISION_HEADER: &str = "hive-revision";

/// Percent-encodes one path segment, so a hostile name cannot reach another route.
pub fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'_' | b'.' | b'~') && !(s == "." || s == "..")
        {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The HTTP client Hive's parts talk to each other with: rustls on ring, short connect
/// timeout, a pool per host, no Nagle.
pub fn http() -> Result<reqwest::Client> {
    // reqwest is built without a default TLS provider: pick ring (no C toolchain needed).
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .pool_max_idle_per_host(64)
        .tcp_nodelay(true)
        .build()
        .map_err(ClientError::Build)
}

/// What `GET …/instances/{name}/logs` returns.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LogsQuery {
    /// Keep streaming until the container exits.
    pub follow: bool,
    /// Only the last N lines.
    pub tail: Option<u64>,
    /// Prefix each line with its RFC 3339 time.
    pub timestamps: bool,
}

impl LogsQuery {
    pub fn to_query(&self) -> String {
        let mut q = format!("follow={}&timestamps={}", self.follow, self.timestamps);
        if let Some(n) = self.tail {
            q.push_str(&format!("&tail={n}"));
        }
        q
    }
}

/// Bytes as they arrive.
pub type ByteStream = std::pin::Pin<Box<dyn Stream<Item = Result<bytes::Bytes>> + Send>>;

impl Client {
    /// A client of the server at `base` (`http://127.0.0.1:7080`) acting with `token`.
    pub fn new(base: &str, token: Option<String>) -> Result<Self> {
        Ok(Self {
            http: http()?,
            base: base_url(base)?,
            token,
            leader_epoch: None,
            seen: Arc::default(),
        })
    }

    /// The same client (token, leader epoch, and the revisions it has seen) talking to
    /// another server of the same control plane: what it wrote or read through one, it reads
    /// at least as new through the other. Clients made with [`Client::new`] are separate
    /// sessions, which see each other's writes once the answering server's watch cache has
    /// them (milliseconds, at most its staleness bound).
    pub fn for_server(&self, base: &str) -> Result<Self> {
        Ok(Self {
            base: base_url(base)?,
            ..self.clone()
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// The bearer token this client sends.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.request_at(method, path).0
    }

    /// A request, and the revision it asks to be answered at or after (0: any).
    fn request_at(&self, method: Method, path: &str) -> (RequestBuilder, u64) {
        let mut rb = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            rb = rb.bearer_auth(t);
        }
        if let Some(e) = self.leader_epoch {
            rb = rb.header(LEADER_EPOCH_HEADER, e.to_string());
        }
        match self.seen.load(Ordering::Acquire) {
            0 => (rb, 0),
            seen => (rb.header(MIN_REVISION_HEADER, seen), seen),
        }
    }

    /// Takes in the revision a response reports. One below what was asked means the server's
    /// store has another history (it was migrated or replaced): start again from its own.
    fn note_revision(&self, resp: &reqwest::Response, asked: u64) {
        let Some(reported) = resp
            .headers()
            .get(REVISION_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
        else {
            return;
        };
        let _ = self
            .seen
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |seen| {
                Some(if reported < asked {
                    reported
                } else {
                    seen.max(reported)
                })
            });
    }

    /// This client's writes apply only while the leader's term `epoch` lasts (a
    /// controller's client; the server checks it in each write's transaction).
    pub fn with_leader_epoch(mut self, epoch: u64) -> Self {
        self.leader_epoch = Some(epoch);
        self
    }

    async fn send<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T> {
        let (rb, asked) = self.request_at(method.clone(), path);
        let mut rb = rb.timeout(REQUEST_TIMEOUT);
        if let Some(b) = body {
            rb = rb.json(b);
        }
        let url = format!("{}{path}", self.base);
        let resp = rb.send().await.map_err(|source| ClientError::Transport {
            method: method.clone(),
            url: url.clone(),
            source,
        })?;
        self.note_revision(&resp, asked);
        let resp = check(resp).await?;
        let bytes = resp
            .bytes()
            .await
            .map_err(|source| ClientError::Transport {
                method,
                url: url.clone(),
                source,
            })?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode {
            url,
            message: e.to_string(),
        })
    }

    /// The collection path of kind `R` in `tenant`.
    pub fn collection_path<R: Resource>(tenant: Option<&str>) -> String {
        match R::SCOPE {
            Scope::Cluster => format!("{API_PREFIX}/{}", R::PLURAL),
            Scope::Tenant => format!(
                "{API_PREFIX}/tenants/{}/{}",
                segment(tenant.unwrap_or_default()),
                R::PLURAL
            ),
        }
    }

    fn item_path<R: Resource>(tenant: Option<&str>, name: &str) -> String {
        format!("{}/{}", Self::collection_path::<R>(tenant), segment(name))
    }

    pub async fn whoami(&self) -> Result<WhoAmI> {
        self.send(Method::GET, &format!("{API_PREFIX}/whoami"), None::<&()>)
            .await
    }

    pub async fn create<R: Resource>(&self, tenant: Option<&str>, obj: &R) -> Result<R> {
        self.send(Method::POST, &Self::collection_path::<R>(tenant), Some(obj))
            .await
    }

    pub async fn get<R: Resource>(&self, tenant: Option<&str>, name: &str) -> Result<R> {
        self.send(
            Method::GET,
            &Self::item_path::<R>(tenant, name),
            None::<&()>,
        )
        .await
    }

    /// One page of up to `limit` objects after `continue_`.
    pub async fn list_page<R: Resource>(
        &self,
        tenant: Option<&str>,
        limit: Option<usize>,
        continue_: Option<&str>,
    ) -> Result<List<R>> {
        let mut path = Self::collection_path::<R>(tenant);
        let mut sep = '?';
        if let Some(l) = limit {
            path.push_str(&format!("{sep}limit={l}"));
            sep = '&';
        }
        if let Some(c) = continue_ {
            path.push_str(&format!("{sep}continue={}", segment(c)));
        }
        self.send(Method::GET, &path, None::<&()>).await
    }

    /// Every object, following `continue` to the end.
    pub async fn list<R: Resource>(&self, tenant: Option<&str>) -> Result<List<R>> {
        let mut page = self.list_page::<R>(tenant, None, None).await?;
        while let Some(c) = page.continue_.take() {
            let next = self.list_page::<R>(tenant, None, Some(&c)).await?;
            page.items.extend(next.items);
            page.revision = next.revision;
            page.continue_ = next.continue_;
        }
        Ok(page)
    }

    /// Replaces the spec; `obj.revision()` is the precondition (0: none).
    pub async fn update<R: Resource>(&self, tenant: Option<&str>, obj: &R) -> Result<R> {
        self.send(
            Method::PUT,
            &Self::item_path::<R>(tenant, obj.name()),
            Some(obj),
        )
        .await
    }

    pub async fn update_status<R: Resource>(&self, tenant: Option<&str>, obj: &R) -> Result<R> {
        let path = format!("{}/status", Self::item_path::<R>(tenant, obj.name()));
        self.send(Method::PUT, &path, Some(obj)).await
    }

    pub async fn delete<R: Resource>(&self, tenant: Option<&str>, name: &str) -> Result<R> {
        self.send(
            Method::DELETE,
            &Self::item_path::<R>(tenant, name),
            None::<&()>,
        )
        .await
    }

    /// Acts on service `name`'s rollout (promote, rollback, undo); answers the service as
    /// written.
    pub async fn rollout(
        &self,
        tenant: &str,
        name: &str,
        action: &hive_api::RolloutAction,
    ) -> Result<hive_api::Service> {
        let path = format!(
            "{}/rollout",
            Self::item_path::<hive_api::Service>(Some(tenant), name)
        );
        self.send(Method::POST, &path, Some(action)).await
    }

    /// `GET path` without a timeout (the body is a stream the caller reads as it comes):
    /// the full URL and the response, once its status was a success.
    async fn get_streamed(&self, path: &str) -> Result<(String, reqwest::Response)> {
        let url = format!("{}{path}", self.base);
        let (rb, asked) = self.request_at(Method::GET, path);
        let resp = rb.send().await.map_err(|source| ClientError::Transport {
            method: Method::GET,
            url: url.clone(),
            source,
        })?;
        self.note_revision(&resp, asked);
        Ok((url, check(resp).await?))
    }

    /// Changes of kind `R` after `revision` (default: from now), as they happen.
    pub async fn watch<R: Resource>(
        &self,
        tenant: Option<&str>,
        revision: Option<u64>,
    ) -> Result<WatchStream<R>> {
        let mut path = format!("{}?watch=true", Self::collection_path::<R>(tenant));
        if let Some(r) = revision {
            path.push_str(&format!("&revision={r}"));
        }
        let (url, resp) = self.get_streamed(&path).await?;
        Ok(ndjson::<WatchEvent<R>>(url, resp).boxed())
    }

    pub async fn create_token(
        &self,
        tenant: Option<&str>,
        req: &TokenCreate,
    ) -> Result<CreatedToken> {
        self.send(Method::POST, &tokens_path(tenant), Some(req))
            .await
    }

    pub async fn list_tokens(&self, tenant: Option<&str>) -> Result<List<ApiToken>> {
        self.send(Method::GET, &tokens_path(tenant), None::<&()>)
            .await
    }

    pub async fn revoke_token(&self, tenant: Option<&str>, id: &str) -> Result<ApiToken> {
        self.send(
            Method::DELETE,
            &format!("{}/{}", tokens_path(tenant), segment(id)),
            None::<&()>,
        )
        .await
    }

    /// The tenant's image repositories and its registry usage.
    pub async fn list_images(&self, tenant: &str) -> Result<hive_api::ImageList> {
        self.send(Method::GET, &images_path(tenant, None), None::<&()>)
            .await
    }

    /// Makes repository `name` (without the tenant) public or private.
    pub async fn set_image_public(
        &self,
        tenant: &str,
        name: &str,
        public: bool,
    ) -> Result<hive_api::ImageRepository> {
        let body = hive_api::ImageUpdate { public };
        self.send(Method::PATCH, &images_path(tenant, Some(name)), Some(&body))
            .await
    }

    /// Deletes repository `name` (without the tenant).
    pub async fn delete_image(
        &self,
        tenant: &str,
        name: &str,
    ) -> Result<hive_api::ImageRepository> {
        self.send(
            Method::DELETE,
            &images_path(tenant, Some(name)),
            None::<&()>,
        )
        .await
    }

    /// Collects the registry's garbage now (platform admin).
    pub async fn registry_gc(&self, grace_seconds: u64) -> Result<hive_api::RegistryGcReport> {
        let path = format!("{API_PREFIX}/registry/gc?grace_seconds={grace_seconds}");
        self.send(Method::POST, &path, None::<&()>).await
    }

    /// The server's key for node proxy tokens.
    pub async fn proxy_key(&self) -> Result<hive_api::ProxyKey> {
        self.send(Method::GET, &format!("{API_PREFIX}/proxy-key"), None::<&()>)
            .await
    }

    /// An instance's container output (stdout and stderr in order), streamed.
    pub async fn logs(&self, tenant: &str, instance: &str, q: &LogsQuery) -> Result<ByteStream> {
        let path = format!(
            "{}/logs?{}",
            Self::item_path::<hive_api::Instance>(Some(tenant), instance),
            q.to_query()
        );
        let (url, resp) = self.get_streamed(&path).await?;
        Ok(resp
            .bytes_stream()
            .map(move |r| {
                r.map_err(|source| ClientError::Transport {
                    method: Method::GET,
                    url: url.clone(),
                    source,
                })
            })
            .boxed())
    }

    /// Opens an exec session in an instance's container: the upgraded connection carries
    /// [`exec::Frame`]s.
    pub async fn exec(
        &self,
        tenant: &str,
        instance: &str,
        command: &[String],
        tty: bool,
    ) -> Result<reqwest::Upgraded> {
        let json = serde_json::to_string(command).unwrap_or_default();
        let path = format!(
            "{}/exec?command={}&tty={tty}",
            Self::item_path::<hive_api::Instance>(Some(tenant), instance),
            segment(&json)
        );
        let url = format!("{}{path}", self.base);
        let transport = |source| ClientError::Transport {
            method: Method::POST,
            url: url.clone(),
            source,
        };
        let resp = self
            .request(Method::POST, &path)
            .header(reqwest::header::CONNECTION, "upgrade")
            .header(reqwest::header::UPGRADE, exec::PROTOCOL)
            .send()
            .await
            .map_err(transport)?;
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            let resp = check(resp).await?;
            return Err(ClientError::Decode {
                url,
                message: format!("expected 101 Switching Protocols, got {}", resp.status()),
            });
        }
        resp.upgrade().await.map_err(transport)
    }

    /// `GET /healthz`: the server answers and its store is readable.
    pub async fn health(&self) -> Result<()> {
        let url = format!("{}/healthz", self.base);
        let resp = self
            .http
            .get(&url)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .map_err(|source| ClientError::Transport {
                method: Method::GET,
                url,
                source,
            })?;
        check(resp).await.map(drop)
    }
}

/// A server's base URL without its trailing `/`; only `http://` and `https://`.
fn base_url(base: &str) -> Result<String> {
    let base = base.trim_end_matches('/').to_owned();
    if !(base.starts_with("http://") || base.starts_with("https://")) {
        return Err(ClientError::Url(base));
    }
    Ok(base)
}

/// `…/tenants/{tenant}/images[/{name}]`; a nested name keeps its `/` separators.
fn images_path(tenant: &str, name: Option<&str>) -> String {
    let base = format!("{API_PREFIX}/tenants/{}/images", segment(tenant));
    match name {
        Some(n) => {
            let parts: Vec<String> = n.split('/').map(segment).collect();
            format!("{base}/{}", parts.join("/"))
        }
        None => base,
    }
}

fn tokens_path(tenant: Option<&str>) -> String {
    match tenant {
        Some(t) => format!("{API_PREFIX}/tenants/{}/tokens", segment(t)),
        None => format!("{API_PREFIX}/tokens"),
    }
}

/// Turns an error status into [`ClientError::Api`].
async fn check(resp: reqwest::Response) -> Result<reqwest::Response> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let retry_after = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let url = resp.url().to_string();
    let bytes = resp.bytes().await.unwrap_or_default();
    let body = serde_json::from_slice::<ApiErrorBody>(&bytes).unwrap_or_else(|_| ApiErrorBody {
        code: hive_api::ErrorCode::Internal,
        message: format!("{url} answered {status} without an API error body"),
        request_id: String::new(),
    });
    Err(ClientError::Api {
        status,
        body,
        retry_after,
    })
}

/// Splits a streamed body into JSON lines.
fn ndjson<T: DeserializeOwned + Send>(
    url: String,
    resp: reqwest::Response,
) -> impl Stream<Item = Result<T>> + Send {
    let body = resp.bytes_stream();
    futures_util::stream::unfold(
        (body.boxed(), BytesMut::new(), url, false),
        |(mut body, mut buf, url, done)| async move {
            if done {
                return None;
            }
            loop {
                if let Some(pos) = buf.iter().position(|&b| b == b'\n') {
                    let line = buf.split_to(pos + 1);
                    let line = &line[..pos];
                    if line.is_empty() {
                        continue;
                    }
                    let item = serde_json::from_slice::<T>(line).map_err(|e| ClientError::Decode {
                        url: url.clone(),
                        message: e.to_string(),
                    });
                    return Some((item, (body, buf, url, false)));
                }
                match body.next().await {
                    Some(Ok(chunk)) => buf.extend_from_slice(chunk.chunk()),
                    Some(Err(source)) => {
                        let err = ClientError::Transport {
                            method: Method::GET,
                            url: url.clone(),
                            source,
                        };
                        return Some((Err(err), (body, buf, url, true)));
                    }
                    None => return None,
                }
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_are_escaped() {
        assert_eq!(segment("web-1"), "web-1");
        assert_eq!(segment("a/b"), "a%2Fb");
        assert_eq!(segment(".."), "%2E%2E");
        assert_eq!(segment("a b"), "a%20b");
    }

    #[test]
    fn paths() {
        use hive_api::{Node, Service};
        assert_eq!(
            Client::collection_path::<Service>(Some("acme")),
            "/api/v1/tenants/acme/services"
        );
        assert_eq!(Client::collection_path::<Node>(None), "/api/v1/nodes");
        assert_eq!(tokens_path(None), "/api/v1/tokens");
    }
}
