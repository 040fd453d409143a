//! A minimal OCI distribution client for pulling: manifests and blobs over the workspace's
//! reqwest, with bearer-token auth (`401` + `WWW-Authenticate: Bearer realm,service,scope`,
//! optionally with Basic credentials at the token endpoint) and Basic auth. Plain HTTP only
//! for registries configured as insecure.
//!
//! Every byte it returns is verified against its digest: manifests and configs in memory,
//! layers while they stream to a file. It does not parse manifests or touch the store.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use futures_util::StreamExt;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderMap, WWW_AUTHENTICATE};
use reqwest::{RequestBuilder, StatusCode};

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
    #[error("{url}: not found (404)")]
    NotFound { url: String },
    #[error("{url}: unexpected status {status}")]
    Status { url: String, status: u16 },
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
    /// Bearer tokens by (registry, repository); pulls only ever need `pull` scope.
    tokens: Mutex<HashMap<(String, String), String>>,
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
        })
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
        let mut hasher = ring::digest::Context::new(&ring::digest::SHA256);
        let mut got = 0u64;
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|source| RegistryError::Http {
                url: url.clone(),
                source,
            })?;
            got += chunk.len() as u64;
            // A registry that sends more than the manifest promised is cut off here, before
            // the extra bytes reach the unpacker.
            if got > size {
                return Err(RegistryError::SizeMismatch {
                    digest: digest.to_owned(),
                    expected: size,
                    actual: got,
                });
            }
            hasher.update(&chunk);
            if sink.send(BlobChunk::Data(chunk)).await.is_err() {
                return Err(RegistryError::Aborted {
                    digest: digest.to_owned(),
                });
            }
        }
        if got != size {
            return Err(RegistryError::SizeMismatch {
                digest: digest.to_owned(),
                expected: size,
                actual: got,
            });
        }
        let actual = format!("sha256:{}", hex::encode(hasher.finish()));
        if actual != digest {
            return Err(RegistryError::DigestMismatch {
                digest: digest.to_owned(),
                actual,
            });
        }
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
            return check_status(resp, url);
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
        check_status(resp, url)
    }

    fn cached_token(&self, key: &(String, String)) -> Option<String> {
        self.tokens.lock().ok().and_then(|t| t.get(key).cloned())
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

fn check_status(resp: reqwest::Response, url: &str) -> Result<reqwest::Response> {
    match resp.status() {
        s if s.is_success() => Ok(resp),
        StatusCode::NOT_FOUND => Err(RegistryError::NotFound {
            url: url.to_owned(),
        }),
        s => Err(RegistryError::Status {
            url: url.to_owned(),
            status: s.as_u16(),
        }),
    }
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
    match d.strip_prefix("sha256:") {
        Some(h) if h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) => {
            Ok(())
        }
        _ => Err(RegistryError::UnsupportedDigest(d.to_owned())),
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
    fn base64_matches_rfc4648() {
        assert_eq!(base64_encode(b""), "");
        assert_eq!(base64_encode(b"f"), "Zg==");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        assert_eq!(base64_encode(b"foo"), "Zm9v");
        assert_eq!(base64_encode(b"user:pass"), "dXNlcjpwYXNz");
    }
}
