//! A minimal OCI distribution client: manifests and blobs over the workspace's reqwest, with
//! bearer-token auth (`401` + `WWW-Authenticate: Bearer realm,service,scope`, optionally with
//! Basic credentials at the token endpoint), Basic auth, or a token sent up front
//! ([`RegistryClient::with_token`]). Plain HTTP only for registries configured as insecure.
//!
//! Pulling (the agent and `hive pull`): every byte it returns is verified against its digest,
//! manifests and configs in memory, layers while they stream. Pushing (`hive push`): blobs are
//! streamed from a file range and hashed on the way, manifests are put as given. It does not
//! parse manifests, read layouts or touch the store.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use reqwest::header::{
    ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, HeaderMap, LOCATION, WWW_AUTHENTICATE,
};
use reqwest::{RequestBuilder, StatusCode};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::reference::Reference;

/// Manifest media types the client asks for, in order of preference.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.docker.distribution.manifest.v2+json";

/// Manifests and configs are small; anything bigger is refused before it is buffered.
pub const MAX_SMALL_BLOB: u64 = 8 << 20;

#[derive(Debug, Clone)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

/// A piece of a layer blob on its way from the registry to the unpacker.
#[derive(Debug)]
pub enum BlobChunk {
    Data(bytes::Bytes),
    /// Everything was sent and matched the digest and size.
    Verified,
    /// The download failed; what was sent must be thrown away.
    Failed(String),
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{url}: {source}")]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{url}: not found (404){remote}")]
    NotFound { url: String, remote: RemoteErrors },
    #[error("{url}: unexpected status {status}{remote}")]
    Status {
        url: String,
        status: u16,
        remote: RemoteErrors,
    },
    #[error("{url}: authentication failed: {message}")]
    Auth { url: String, message: String },
    #[error("digest mismatch: expected {digest}, got {actual}")]
    DigestMismatch { digest: String, actual: String },
    #[error("download of {digest} stopped: its reader went away")]
    Aborted { digest: String },
    #[error("size mismatch for {digest}: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        digest: String,
        expected: u64,
        actual: u64,
    },
    #[error("{url}: response larger than {limit} bytes")]
    TooLarge { url: String, limit: u64 },
    #[error("unsupported digest {0:?} (only sha256)")]
    UnsupportedDigest(String),
    #[error("write blob {digest}: {source}")]
    Write {
        digest: String,
        #[source]
        source: std::io::Error,
    },
    #[error("read blob {digest} to push: {source}")]
    Read {
        digest: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{url}: {message}")]
    Protocol { url: String, message: String },
}

/// The errors a registry explained a failure with (`{"errors":[{"code","message"}]}`, the
/// distribution spec's body), shown after the status: `: NAME_UNKNOWN: repository …`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RemoteErrors(pub Vec<RemoteError>);

#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct RemoteError {
    pub code: String,
    #[serde(default)]
    pub message: String,
}

impl RemoteErrors {
    /// The errors in a response body; none when it is not the spec's JSON.
    pub fn parse(body: &[u8]) -> Self {
        #[derive(serde::Deserialize)]
        struct Body {
            errors: Vec<RemoteError>,
        }
        RemoteErrors(
            serde_json::from_slice::<Body>(body)
                .map(|b| b.errors)
                .unwrap_or_default(),
        )
    }

    pub fn codes(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|e| e.code.as_str())
    }
}

impl fmt::Display for RemoteErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            let sep = if i == 0 { ": " } else { "; " };
            write!(f, "{sep}{}", e.code)?;
            if !e.message.is_empty() {
                write!(f, ": {}", e.message.replace('\n', " "))?;
            }
        }
        Ok(())
    }
}

/// `len` bytes of a file from `offset`: a blob in an OCI layout directory, or inside an
/// uncompressed tar. Read with `pread`, so one open file serves any number of readers.
#[derive(Debug, Clone)]
pub struct FileRange {
    pub file: Arc<File>,
    pub offset: u64,
    pub len: u64,
}

/// Called with the number of bytes each chunk moved (for progress bars).
pub type OnBytes = Arc<dyn Fn(u64) + Send + Sync>;

/// Checks a blob's size and digest as its bytes go by.
struct Verifier {
    digest: String,
    size: u64,
    got: u64,
    hasher: ring::digest::Context,
}

impl Verifier {
    fn new(digest: &str, size: u64) -> Self {
        Verifier {
            digest: digest.to_owned(),
            size,
            got: 0,
            hasher: ring::digest::Context::new(&ring::digest::SHA256),
        }
    }

    /// Fails as soon as there are more bytes than promised, before they are passed on.
    fn update(&mut self, chunk: &[u8]) -> Result<()> {
        self.got += chunk.len() as u64;
        if self.got > self.size {
            return Err(RegistryError::SizeMismatch {
                digest: self.digest.clone(),
                expected: self.size,
                actual: self.got,
            });
        }
        self.hasher.update(chunk);
        Ok(())
    }

    fn finish(self) -> Result<()> {
        if self.got != self.size {
            return Err(RegistryError::SizeMismatch {
                digest: self.digest,
                expected: self.size,
                actual: self.got,
            });
        }
        let actual = format!("sha256:{}", hex::encode(self.hasher.finish()));
        if actual != self.digest {
            return Err(RegistryError::DigestMismatch {
                digest: self.digest,
                actual,
            });
        }
        Ok(())
    }
}

type Result<T, E = RegistryError> = std::result::Result<T, E>;

/// A fetched manifest (or index), verified.
#[derive(Debug, Clone)]
pub struct FetchedManifest {
    pub bytes: Vec<u8>,
    /// The `Content-Type` the registry sent, if any.
    pub content_type: Option<String>,
    /// `sha256:<hex>` of `bytes`.
    pub digest: String,
}

#[derive(Debug)]
pub struct RegistryClient {
    http: reqwest::Client,
    insecure: Vec<String>,
    credentials: HashMap<String, Credentials>,
    /// `Authorization` values by (registry, repository), from the token endpoint.
    tokens: Mutex<HashMap<(String, String), String>>,
    /// `Authorization` values sent up front to a registry (before any challenge).
    preset: HashMap<String, String>,
}

impl RegistryClient {
    /// `insecure`: registry hosts (`host:port`) reached over plain HTTP.
    pub fn new(insecure: Vec<String>, credentials: HashMap<String, Credentials>) -> Result<Self> {
        // reqwest is built without a default TLS provider: pick ring, as hive-client does.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(15))
            .read_timeout(Duration::from_secs(60))
            .user_agent(concat!("hive-agent/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|source| RegistryError::Http {
                url: "client".into(),
                source,
            })?;
        Ok(RegistryClient {
            http,
            insecure,
            credentials,
            tokens: Mutex::new(HashMap::new()),
            preset: HashMap::new(),
        })
    }

    /// Sends `Authorization: Bearer <token>` to `registry` with every request, before any
    /// challenge (Hive's registry takes a Hive API token so). The same token is also the
    /// Basic password at a token endpoint, should the registry challenge anyway.
    pub fn with_token(mut self, registry: &str, token: &str) -> Self {
        self.preset
            .insert(registry.to_owned(), format!("Bearer {token}"));
        self.credentials.insert(
            registry.to_owned(),
            Credentials {
                username: "hive".into(),
                password: token.to_owned(),
            },
        );
        self
    }

    fn base(&self, r: &Reference) -> String {
        let scheme = if self.insecure.iter().any(|h| h == &r.registry) {
            "http"
        } else {
            "https"
        };
        format!("{scheme}://{}/v2/{}", r.api_host(), r.repository)
    }

    /// Fetches the manifest `what` (tag or digest) of `r`'s repository.
    pub async fn manifest(&self, r: &Reference, what: &str) -> Result<FetchedManifest> {
        let url = format!("{}/manifests/{what}", self.base(r));
        let resp = self
            .send(r, &url, |c| c.get(&url).header(ACCEPT, MANIFEST_ACCEPT))
            .await?;
        let content_type = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.split(';').next().unwrap_or(s).trim().to_owned());
        let bytes = read_small(resp, &url).await?;
        let digest = sha256_of(&bytes);
        if what.starts_with("sha256:") && digest != what {
            return Err(RegistryError::DigestMismatch {
                digest: what.to_owned(),
                actual: digest,
            });
        }
        Ok(FetchedManifest {
            bytes,
            content_type,
            digest,
        })
    }

    /// Fetches a small blob (an image config) into memory and verifies it.
    pub async fn small_blob(&self, r: &Reference, digest: &str) -> Result<Vec<u8>> {
        check_digest(digest)?;
        let url = format!("{}/blobs/{digest}", self.base(r));
        let resp = self.send(r, &url, |c| c.get(&url)).await?;
        let bytes = read_small(resp, &url).await?;
        let actual = sha256_of(&bytes);
        if actual != digest {
            return Err(RegistryError::DigestMismatch {
                digest: digest.to_owned(),
                actual,
            });
        }
        Ok(bytes)
    }

    /// Streams a blob into `sink` chunk by chunk, hashing as it goes, and ends with
    /// [`BlobChunk::Verified`] only when size and digest match (else [`BlobChunk::Failed`]).
    /// A sink that goes away (the unpacker failed) stops the download.
    pub async fn blob_stream(
        &self,
        r: &Reference,
        digest: &str,
        size: u64,
        sink: &tokio::sync::mpsc::Sender<BlobChunk>,
    ) -> Result<()> {
        let result = self.blob_stream_inner(r, digest, size, sink).await;
        let end = match &result {
            Ok(()) => BlobChunk::Verified,
            Err(e) => BlobChunk::Failed(e.to_string()),
        };
        let _ = sink.send(end).await;
        result
    }

    async fn blob_stream_inner(
        &self,
        r: &Reference,
        digest: &str,
        size: u64,
        sink: &tokio::sync::mpsc::Sender<BlobChunk>,
    ) -> Result<()> {
        check_digest(digest)?;
        let url = format!("{}/blobs/{digest}", self.base(r));
        let resp = self.send(r, &url, |c| c.get(&url)).await?;
        let mut verifier = Verifier::new(digest, size);
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|source| RegistryError::Http {
                url: url.clone(),
                source,
            })?;
            // A registry that sends more than the manifest promised is cut off here, before
            // the extra bytes reach the unpacker.
            verifier.update(&chunk)?;
            if sink.send(BlobChunk::Data(chunk)).await.is_err() {
                return Err(RegistryError::Aborted {
                    digest: digest.to_owned(),
                });
            }
        }
        verifier.finish()
    }

    /// Writes a blob into `out` as it arrives, hashing as it goes; `Ok` only when size and
    /// digest match. On error `out` holds a partial blob: the caller throws it away.
    pub async fn blob_to_writer<W: AsyncWrite + Unpin>(
        &self,
        r: &Reference,
        digest: &str,
        size: u64,
        out: &mut W,
        on_bytes: &OnBytes,
    ) -> Result<()> {
        check_digest(digest)?;
        let url = format!("{}/blobs/{digest}", self.base(r));
        let resp = self.send(r, &url, |c| c.get(&url)).await?;
        let mut verifier = Verifier::new(digest, size);
        let mut stream = resp.bytes_stream();
        let write_err = |source| RegistryError::Write {
            digest: digest.to_owned(),
            source,
        };
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|source| RegistryError::Http {
                url: url.clone(),
                source,
            })?;
            verifier.update(&chunk)?;
            out.write_all(&chunk).await.map_err(write_err)?;
            on_bytes(chunk.len() as u64);
        }
        out.flush().await.map_err(write_err)?;
        verifier.finish()
    }

    /// Whether `r`'s repository has the blob (`HEAD`); a 404 is `false`.
    pub async fn has_blob(&self, r: &Reference, digest: &str) -> Result<bool> {
        check_digest(digest)?;
        let url = format!("{}/blobs/{digest}", self.base(r));
        match self.send(r, &url, |c| c.head(&url)).await {
            Ok(_) => Ok(true),
            Err(RegistryError::NotFound { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Uploads a blob in one piece (`POST` a session, then `PUT ?digest=` with the whole
    /// content), streaming it from `from` and hashing it on the way: content that does not
    /// match `digest` or `from.len` fails with [`RegistryError::DigestMismatch`] or
    /// [`RegistryError::SizeMismatch`] (the registry refuses it too, and keeps nothing).
    pub async fn push_blob(
        &self,
        r: &Reference,
        digest: &str,
        from: &FileRange,
        on_bytes: &OnBytes,
    ) -> Result<()> {
        check_digest(digest)?;
        let url = format!("{}/blobs/uploads/", self.base(r));
        let resp = self.send(r, &url, |c| c.post(&url)).await?;
        if resp.status() != StatusCode::ACCEPTED {
            return Err(RegistryError::Protocol {
                url,
                message: format!("upload start answered {}, not 202", resp.status().as_u16()),
            });
        }
        let location = resp
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| RegistryError::Protocol {
                url: url.clone(),
                message: "upload start without a Location".into(),
            })?;
        let mut put = reqwest::Url::parse(&url)
            .and_then(|u| u.join(location))
            .map_err(|e| RegistryError::Protocol {
                url: url.clone(),
                message: format!("bad upload Location {location:?}: {e}"),
            })?;
        put.query_pairs_mut().append_pair("digest", digest);
        let put_url = put.to_string();
        // The body is made anew for a retry after a challenge; the first failure of our own
        // reading (a layout that does not match its digest) is kept to be reported as such.
        let local_failure: Arc<Mutex<Option<RegistryError>>> = Arc::default();
        let result = self
            .send(r, &put_url, |c| {
                c.put(put.clone())
                    .header(CONTENT_TYPE, "application/octet-stream")
                    .header(CONTENT_LENGTH, from.len)
                    .body(file_body(
                        digest,
                        from.clone(),
                        on_bytes.clone(),
                        local_failure.clone(),
                    ))
            })
            .await;
        if let Some(e) = local_failure.lock().ok().and_then(|mut f| f.take()) {
            return Err(e);
        }
        result?;
        Ok(())
    }

    /// Puts a manifest (or index) as `reference` (tag or digest); returns the digest the
    /// registry answered with (`Docker-Content-Digest`), else the content's.
    pub async fn put_manifest(
        &self,
        r: &Reference,
        reference: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<String> {
        let url = format!("{}/manifests/{reference}", self.base(r));
        let body = bytes::Bytes::copy_from_slice(bytes);
        let resp = self
            .send(r, &url, |c| {
                c.put(&url)
                    .header(CONTENT_TYPE, media_type)
                    .body(body.clone())
            })
            .await?;
        let digest = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map_or_else(|| sha256_of(bytes), str::to_owned);
        Ok(digest)
    }

    /// Deletes `reference` of the repository: a tag (the manifest stays), or a manifest by
    /// digest (with every tag pointing at it).
    pub async fn delete_manifest(&self, r: &Reference, reference: &str) -> Result<()> {
        let url = format!("{}/manifests/{reference}", self.base(r));
        self.send(r, &url, |c| c.delete(&url)).await?;
        Ok(())
    }

    async fn send(
        &self,
        r: &Reference,
        url: &str,
        build: impl Fn(&reqwest::Client) -> RequestBuilder,
    ) -> Result<reqwest::Response> {
        let key = (r.registry.clone(), r.repository.clone());
        let cached = self.cached_token(&key);
        let mut req = build(&self.http);
        if let Some(auth) = &cached {
            req = req.header(AUTHORIZATION, auth);
        }
        let resp = req.send().await.map_err(|source| RegistryError::Http {
            url: url.to_owned(),
            source,
        })?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            return check_status(resp, url).await;
        }
        let auth = self.authorize(r, url, resp.headers()).await?;
        if let Ok(mut t) = self.tokens.lock() {
            t.insert(key, auth.clone());
        }
        let resp = build(&self.http)
            .header(AUTHORIZATION, auth)
            .send()
            .await
            .map_err(|source| RegistryError::Http {
                url: url.to_owned(),
                source,
            })?;
        if resp.status() == StatusCode::UNAUTHORIZED {
            return Err(RegistryError::Auth {
                url: url.to_owned(),
                message: "credentials refused".into(),
            });
        }
        check_status(resp, url).await
    }

    fn cached_token(&self, key: &(String, String)) -> Option<String> {
        self.tokens
            .lock()
            .ok()
            .and_then(|t| t.get(key).cloned())
            .or_else(|| self.preset.get(&key.0).cloned())
    }

    /// Turns a `WWW-Authenticate` challenge into an `Authorization` header value.
    async fn authorize(&self, r: &Reference, url: &str, headers: &HeaderMap) -> Result<String> {
        let auth_err = |message: String| RegistryError::Auth {
            url: url.to_owned(),
            message,
        };
        let challenge = headers
            .get(WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| auth_err("401 without a WWW-Authenticate challenge".into()))?;
        let creds = self.credentials.get(&r.registry);
        let (scheme, params) = parse_challenge(challenge);
        if scheme.eq_ignore_ascii_case("basic") {
            let c = creds.ok_or_else(|| auth_err("basic auth required, no credentials".into()))?;
            return Ok(basic_header(c));
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(auth_err(format!("unsupported auth scheme {scheme:?}")));
        }
        let realm = params
            .get("realm")
            .ok_or_else(|| auth_err("bearer challenge without realm".into()))?;
        let scope = params
            .get("scope")
            .cloned()
            .unwrap_or_else(|| format!("repository:{}:pull", r.repository));
        let mut token_url = reqwest::Url::parse(realm)
            .map_err(|e| auth_err(format!("bad realm {realm:?}: {e}")))?;
        if !matches!(token_url.scheme(), "http" | "https") {
            return Err(auth_err(format!("bad realm {realm:?}: not http(s)")));
        }
        {
            let mut q = token_url.query_pairs_mut();
            q.append_pair("scope", &scope);
            if let Some(service) = params.get("service") {
                q.append_pair("service", service);
            }
        }
        let mut req = self.http.get(token_url);
        if let Some(c) = creds {
            req = req.header(AUTHORIZATION, basic_header(c));
        }
        let resp = req.send().await.map_err(|source| RegistryError::Http {
            url: realm.clone(),
            source,
        })?;
        if !resp.status().is_success() {
            return Err(auth_err(format!(
                "token endpoint {realm} answered {}",
                resp.status().as_u16()
            )));
        }
        let body = read_small(resp, realm).await?;
        #[derive(serde::Deserialize)]
        struct TokenResponse {
            token: Option<String>,
            access_token: Option<String>,
        }
        let t: TokenResponse = serde_json::from_slice(&body)
            .map_err(|e| auth_err(format!("token endpoint {realm}: bad json: {e}")))?;
        let token = t
            .token
            .or(t.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| auth_err(format!("token endpoint {realm} gave no token")))?;
        Ok(format!("Bearer {token}"))
    }
}

fn basic_header(c: &Credentials) -> String {
    format!(
        "Basic {}",
        base64_encode(format!("{}:{}", c.username, c.password).as_bytes())
    )
}

/// Standard base64 with padding (RFC 4648); small enough not to need a crate.
fn base64_encode(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        out.push(T[(n >> 18) as usize & 63] as char);
        out.push(T[(n >> 12) as usize & 63] as char);
        out.push(if chunk.len() > 1 {
            T[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if chunk.len() > 2 {
            T[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

/// Parses `Bearer realm="…",service="…",scope="…"` into the scheme and its parameters.
pub fn parse_challenge(h: &str) -> (String, HashMap<String, String>) {
    let h = h.trim();
    let (scheme, rest) = h.split_once(' ').unwrap_or((h, ""));
    let mut params = HashMap::new();
    let mut rest = rest.trim();
    while !rest.is_empty() {
        let Some((key, after)) = rest.split_once('=') else {
            break;
        };
        let key = key
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let after = after.trim_start();
        let (value, next) = if let Some(quoted) = after.strip_prefix('"') {
            // Values are quoted strings; a scope may itself contain commas.
            let mut val = String::new();
            let mut chars = quoted.char_indices();
            let mut end = quoted.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, n)) = chars.next() {
                            val.push(n);
                        }
                    }
                    '"' => {
                        end = i + 1;
                        break;
                    }
                    c => val.push(c),
                }
            }
            (val, &quoted[end..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim().to_owned(), &after[end..])
        };
        params.insert(key, value);
        rest = next.trim_start().trim_start_matches(',').trim_start();
    }
    (scheme.to_owned(), params)
}

/// A body streaming `from`, checked against `digest` as it goes (see [`file_stream`]).
fn file_body(
    digest: &str,
    from: FileRange,
    on_bytes: OnBytes,
    failure: Arc<Mutex<Option<RegistryError>>>,
) -> reqwest::Body {
    reqwest::Body::wrap_stream(file_stream(digest, from, on_bytes, failure))
}

/// The chunks of `from`, checked against `digest` as they go: a short file or a wrong digest
/// ends the stream with an error instead of its last chunk (the upload fails, never completes
/// with the wrong content) and leaves the cause in `failure`.
fn file_stream(
    digest: &str,
    from: FileRange,
    on_bytes: OnBytes,
    failure: Arc<Mutex<Option<RegistryError>>>,
) -> impl futures_util::Stream<Item = std::io::Result<bytes::Bytes>> + Send + 'static {
    const CHUNK: u64 = 256 << 10;
    struct State {
        from: FileRange,
        pos: u64,
        verifier: Option<Verifier>,
        on_bytes: OnBytes,
        failure: Arc<Mutex<Option<RegistryError>>>,
    }
    let fail = |state: &State, e: RegistryError| {
        if let Ok(mut f) = state.failure.lock() {
            f.get_or_insert(e);
        }
        std::io::Error::other("blob content refused before upload")
    };
    let state = State {
        verifier: Some(Verifier::new(digest, from.len)),
        from,
        pos: 0,
        on_bytes,
        failure,
    };
    let digest = digest.to_owned();
    futures_util::stream::unfold(state, move |mut state| {
        let digest = digest.clone();
        async move {
            state.verifier.as_ref()?;
            let want = CHUNK.min(state.from.len - state.pos);
            if want == 0 {
                let v = state.verifier.take()?;
                return match v.finish() {
                    Ok(()) => None,
                    Err(e) => Some((Err(fail(&state, e)), state)),
                };
            }
            let file = state.from.file.clone();
            let at = state.from.offset + state.pos;
            let read = tokio::task::spawn_blocking(move || {
                let mut buf = vec![0; want as usize];
                let n = file.read_at(&mut buf, at)?;
                buf.truncate(n);
                Ok::<_, std::io::Error>(buf)
            })
            .await
            .map_err(std::io::Error::other)
            .and_then(|r| r);
            let buf = match read {
                Ok(buf) if buf.is_empty() => {
                    // The file is shorter than its descriptor says.
                    let e = RegistryError::SizeMismatch {
                        digest,
                        expected: state.from.len,
                        actual: state.pos,
                    };
                    state.verifier = None;
                    return Some((Err(fail(&state, e)), state));
                }
                Ok(buf) => buf,
                Err(source) => {
                    state.verifier = None;
                    return Some((
                        Err(fail(&state, RegistryError::Read { digest, source })),
                        state,
                    ));
                }
            };
            if let Some(Err(e)) = state.verifier.as_mut().map(|v| v.update(&buf)) {
                state.verifier = None;
                return Some((Err(fail(&state, e)), state));
            }
            state.pos += buf.len() as u64;
            // The last chunk is held back unless the whole verifies: the registry then sees a
            // broken request, not a complete upload of the wrong content.
            if state.pos == state.from.len
                && let Some(Err(e)) = state.verifier.take().map(Verifier::finish)
            {
                return Some((Err(fail(&state, e)), state));
            }
            (state.on_bytes)(buf.len() as u64);
            Some((Ok(bytes::Bytes::from(buf)), state))
        }
    })
}

/// Turns an error status into an error, with the registry's own explanation when its body
/// has one.
async fn check_status(resp: reqwest::Response, url: &str) -> Result<reqwest::Response> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let body = read_small(resp, url).await.unwrap_or_default();
    let remote = RemoteErrors::parse(&body);
    Err(match status {
        StatusCode::NOT_FOUND => RegistryError::NotFound {
            url: url.to_owned(),
            remote,
        },
        s => RegistryError::Status {
            url: url.to_owned(),
            status: s.as_u16(),
            remote,
        },
    })
}

async fn read_small(resp: reqwest::Response, url: &str) -> Result<Vec<u8>> {
    let too_large = || RegistryError::TooLarge {
        url: url.to_owned(),
        limit: MAX_SMALL_BLOB,
    };
    if resp.content_length().is_some_and(|n| n > MAX_SMALL_BLOB) {
        return Err(too_large());
    }
    let mut out = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|source| RegistryError::Http {
            url: url.to_owned(),
            source,
        })?;
        if (out.len() + chunk.len()) as u64 > MAX_SMALL_BLOB {
            return Err(too_large());
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

fn check_digest(d: &str) -> Result<()> {
    if super::layout::valid_digest(d) {
        Ok(())
    } else {
        Err(RegistryError::UnsupportedDigest(d.to_owned()))
    }
}

pub(crate) fn sha256_of(b: &[u8]) -> String {
    format!(
        "sha256:{}",
        hex::encode(ring::digest::digest(&ring::digest::SHA256, b))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer_challenge() {
        let (s, p) = parse_challenge(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#,
        );
        assert_eq!(s, "Bearer");
        assert_eq!(p["realm"], "https://auth.example/token");
        assert_eq!(p["service"], "registry.example");
        assert_eq!(p["scope"], "repository:a/b:pull,push");
        let (s, p) = parse_challenge(r#"Basic realm="x""#);
        assert_eq!(s, "Basic");
        assert_eq!(p["realm"], "x");
    }

    #[test]
    fn remote_errors_are_shown_after_the_status() {
        let body = br#"{"errors":[{"code":"NAME_UNKNOWN","message":"repository a/b is not known","detail":{}},{"code":"DENIED"}]}"#;
        let e = RegistryError::NotFound {
            url: "http://r/v2/a/b/blobs/uploads/".into(),
            remote: RemoteErrors::parse(body),
        };
        assert_eq!(
            e.to_string(),
            "http://r/v2/a/b/blobs/uploads/: not found (404): NAME_UNKNOWN: repository a/b is not known; DENIED"
        );
        let e = RegistryError::Status {
            url: "u".into(),
            status: 500,
            remote: RemoteErrors::parse(b"<html>oops</html>"),
        };
        assert_eq!(e.to_string(), "u: unexpected status 500");
    }

    /// Collects what [`file_stream`] gives for `len` bytes of a file holding `content` at
    /// offset 3, announced as `digest`: the chunks, whether it ended in an error, the bytes
    /// reported, and the recorded failure.
    async fn stream_file(
        content: &[u8],
        len: u64,
        digest: &str,
    ) -> (Vec<u8>, bool, u64, Option<RegistryError>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        std::fs::write(&path, [b"xyz".as_slice(), content].concat()).unwrap();
        let from = FileRange {
            file: Arc::new(File::open(&path).unwrap()),
            offset: 3,
            len,
        };
        let counted = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let c = counted.clone();
        let on_bytes: OnBytes = Arc::new(move |n| {
            c.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        });
        let failure = Arc::default();
        let items: Vec<_> = file_stream(digest, from, on_bytes, Arc::clone(&failure))
            .collect()
            .await;
        let failed = items.iter().any(|i| i.is_err());
        let data = items.into_iter().flatten().flatten().collect();
        let failure = failure.lock().unwrap().take();
        (
            data,
            failed,
            counted.load(std::sync::atomic::Ordering::Relaxed),
            failure,
        )
    }

    #[tokio::test]
    async fn file_stream_sends_a_blob_only_when_it_matches_its_digest() {
        // Several chunks (256 KiB each) and a short last one.
        let content: Vec<u8> = (0..600_000u32).map(|i| (i % 251) as u8).collect();
        let digest = sha256_of(&content);
        let n = content.len() as u64;
        let (data, failed, counted, failure) = stream_file(&content, n, &digest).await;
        assert!(!failed && failure.is_none());
        assert_eq!((data, counted), (content.clone(), n));

        // A wrong digest: everything but the last chunk went, then the error.
        let wrong = sha256_of(b"something else");
        let (data, failed, _, failure) = stream_file(&content, n, &wrong).await;
        assert!(failed);
        assert_eq!(data.len(), 2 * (256 << 10));
        assert!(matches!(
            failure,
            Some(RegistryError::DigestMismatch { .. })
        ));

        // A file shorter than its descriptor says.
        let (_, failed, _, failure) = stream_file(&content, n + 10, &digest).await;
        assert!(failed);
        assert!(
            matches!(failure, Some(RegistryError::SizeMismatch { expected, actual, .. }) if expected == n + 10 && actual == n)
        );

        // The empty blob.
        let (data, failed, _, failure) = stream_file(b"", 0, &sha256_of(b"")).await;
        assert!(data.is_empty() && !failed && failure.is_none());
    }

    #[test]
    fn base64_matches_rfc4648() {
        assert_eq!(base64_encode(b""), "");
        assert_eq!(base64_encode(b"f"), "Zg==");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        assert_eq!(base64_encode(b"foo"), "Zm9v");
        assert_eq!(base64_encode(b"user:pass"), "dXNlcjpwYXNz");
    }
}
