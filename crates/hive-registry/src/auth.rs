//! Who may do what: the seam to Hive's tokens ([`RegistryAuth`]), the short-lived scoped
//! registry tokens of the Docker token flow (HMAC-SHA256 signed, key kept in memory), and
//! the one decision per request: allowed, `401` with a challenge, `DENIED`, or — for another
//! tenant's repository — `NAME_UNKNOWN`, exactly like a missing one.
//!
//! It knows nothing of how Hive stores tokens: the server implements [`RegistryAuth`].

use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::HeaderMap;
use axum::http::header;
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::error::{Code, RegistryError, Result};
use crate::names::Repo;

/// The holder of a Hive API token, as the registry sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Principal {
    /// Who (the token's name); shown in logs only.
    pub subject: String,
    /// The tenant the token acts in; `None` for the platform admin (every tenant).
    pub tenant: Option<String>,
    /// May push and delete (tenant member or above); otherwise pull only (viewer).
    pub push: bool,
}

impl Principal {
    /// A caller without credentials: may pull public repositories only.
    pub fn anonymous() -> Self {
        Self {
            subject: "anonymous".into(),
            tenant: Some(String::new()),
            push: false,
        }
    }

    pub fn is_anonymous(&self) -> bool {
        self.tenant.as_deref() == Some("")
    }

    pub fn sees(&self, tenant: &str) -> bool {
        self.tenant.as_deref().is_none_or(|t| t == tenant)
    }
}

/// Resolves a Hive API token (the password of Basic credentials, or a Bearer token) to its
/// principal. `None`: unknown, revoked or expired.
#[async_trait::async_trait]
pub trait RegistryAuth: Send + Sync + 'static {
    async fn resolve(&self, secret: &str) -> Option<Principal>;

    /// The most bytes `tenant`'s repositories may hold (distinct blobs); `None`: no limit.
    async fn quota(&self, _tenant: &str) -> Option<u64> {
        None
    }
}

/// Pull or push (push implies pull, as in the Docker scopes `pull,push`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Action {
    Pull,
    Push,
}

impl Action {
    fn scope(self) -> &'static str {
        match self {
            Action::Pull => "pull",
            Action::Push => "pull,push",
        }
    }
}

/// The claims of a registry token.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Claims {
    pub principal: Principal,
    /// Unix seconds.
    pub exp: u64,
    /// `(repository, push allowed)` pairs granted.
    pub access: Vec<(String, bool)>,
}

/// Signs and checks registry tokens.
#[derive(Debug)]
pub struct Signer {
    key: [u8; 32],
}

pub const TOKEN_PREFIX: &str = "hrt.";

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Signer {
    pub fn new() -> Self {
        Self {
            key: rand::random(),
        }
    }

    /// The key kept in `root/token.key`, made by the first process that needs it: every
    /// server on the same registry directory signs and checks with it (a token fetched from
    /// one server works on another), and tokens outlive a restart. Readable by the owner
    /// only. Without a usable file, a key of this process alone (logged).
    pub fn shared(root: &std::path::Path) -> Self {
        match load_or_create_key(&root.join("token.key")) {
            Ok(key) => Self { key },
            Err(e) => {
                tracing::warn!(error = %e, root = %root.display(),
                    "registry token key: using one of this process only");
                Self::new()
            }
        }
    }

    fn mac(&self, msg: &[u8]) -> [u8; 32] {
        hmac_sha256(&self.key, msg)
    }

    pub fn sign(&self, claims: &Claims) -> String {
        let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).unwrap_or_default());
        let sig = URL_SAFE_NO_PAD.encode(self.mac(body.as_bytes()));
        format!("{TOKEN_PREFIX}{body}.{sig}")
    }

    /// The claims of a token this signer issued and that has not expired.
    pub fn verify(&self, token: &str) -> Option<Claims> {
        let rest = token.strip_prefix(TOKEN_PREFIX)?;
        let (body, sig) = rest.split_once('.')?;
        let sig = URL_SAFE_NO_PAD.decode(sig).ok()?;
        let want = self.mac(body.as_bytes());
        if sig.len() != want.len() || sig.iter().zip(want).fold(0u8, |a, (x, y)| a | (x ^ y)) != 0 {
            return None;
        }
        let claims: Claims = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(body).ok()?).ok()?;
        (claims.exp > now()).then_some(claims)
    }
}

impl Default for Signer {
    fn default() -> Self {
        Self::new()
    }
}

/// Reads the 32-byte key at `path`, or writes a new one there if there is none. The new key
/// is written whole to a temporary file and linked into place, so that of two processes
/// starting at once one key wins and both read it.
fn load_or_create_key(path: &std::path::Path) -> std::io::Result<[u8; 32]> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let read = |path: &std::path::Path| -> std::io::Result<[u8; 32]> {
        std::fs::read(path)?.try_into().map_err(|_| {
            std::io::Error::other(format!("{} does not hold 32 bytes", path.display()))
        })
    };
    match read(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        other => return other,
    }
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".token.key.{}", uuid::Uuid::new_v4()));
    let key: [u8; 32] = rand::random();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    let written = f.write_all(&key).and_then(|()| f.sync_all());
    let linked = written.and_then(|()| std::fs::hard_link(&tmp, path));
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(key),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => read(path),
        Err(e) => Err(e),
    }
}

/// HMAC-SHA256 (RFC 2104) for a key no longer than the block.
pub fn hmac_sha256(key: &[u8; 32], msg: &[u8]) -> [u8; 32] {
    let mut ipad = [0x36u8; 64];
    let mut opad = [0x5cu8; 64];
    for (i, k) in key.iter().enumerate() {
        ipad[i] ^= k;
        opad[i] ^= k;
    }
    let inner = Sha256::new()
        .chain_update(ipad)
        .chain_update(msg)
        .finalize();
    Sha256::new()
        .chain_update(opad)
        .chain_update(inner)
        .finalize()
        .into()
}

/// The credential a request carries.
#[derive(Debug)]
pub enum Credential {
    None,
    /// A Hive API token (Bearer, or the password of Basic credentials).
    Secret(String),
    /// A registry token from the token endpoint.
    Token(String),
}

pub fn credential(headers: &HeaderMap) -> Result<Credential> {
    let Some(v) = headers.get(header::AUTHORIZATION) else {
        return Ok(Credential::None);
    };
    let bad = || RegistryError::new(Code::Unauthorized, "authorization header is malformed");
    let v = v.to_str().map_err(|_| bad())?.trim();
    if let Some(t) = v
        .strip_prefix("Bearer ")
        .or_else(|| v.strip_prefix("bearer "))
    {
        let t = t.trim();
        return Ok(if t.starts_with(TOKEN_PREFIX) {
            Credential::Token(t.to_owned())
        } else {
            Credential::Secret(t.to_owned())
        });
    }
    if let Some(b) = v
        .strip_prefix("Basic ")
        .or_else(|| v.strip_prefix("basic "))
    {
        let raw = STANDARD.decode(b.trim()).map_err(|_| bad())?;
        let raw = String::from_utf8(raw).map_err(|_| bad())?;
        let (_user, pass) = raw.split_once(':').ok_or_else(bad)?;
        return Ok(Credential::Secret(pass.to_owned()));
    }
    Err(bad())
}

/// The `WWW-Authenticate` value for `scope` (none for `/v2/` itself).
pub fn challenge(realm: &str, service: &str, scope: Option<String>) -> String {
    match scope {
        Some(s) => format!("Bearer realm=\"{realm}\",service=\"{service}\",scope=\"{s}\""),
        None => format!("Bearer realm=\"{realm}\",service=\"{service}\""),
    }
}

pub fn scope_of(repo: &Repo, action: Action) -> String {
    format!("repository:{repo}:{}", action.scope())
}

/// Decides for a principal with full knowledge of its rights. Anyone may pull a `public`
/// repository; pushing stays with its tenant's members.
pub fn decide(p: &Principal, repo: &Repo, action: Action, public: bool) -> Result<()> {
    if public && action == Action::Pull {
        return Ok(());
    }
    if !p.sees(repo.tenant()) {
        return Err(name_unknown(repo));
    }
    if action == Action::Push && !p.push {
        return Err(RegistryError::new(
            Code::Denied,
            format!(
                "{} may only pull from repository {repo} (push needs the member role)",
                p.subject
            ),
        ));
    }
    Ok(())
}

pub fn name_unknown(repo: &Repo) -> RegistryError {
    RegistryError::new(
        Code::NameUnknown,
        format!("repository {repo} is not known to this registry"),
    )
}

/// Parses a Docker scope `repository:<name>:<actions>` (other types are ignored).
pub fn parse_scope(s: &str) -> Option<(Repo, Vec<&str>)> {
    let rest = s.strip_prefix("repository:")?;
    let (name, actions) = rest.rsplit_once(':')?;
    let repo = Repo::parse(name).ok()?;
    Some((repo, actions.split(',').collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_file_is_shared_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let a = Signer::shared(dir.path());
        let b = Signer::shared(dir.path());
        assert_eq!(a.key, b.key, "two processes on one directory sign alike");
        let claims = Claims {
            principal: Principal {
                subject: "x".into(),
                tenant: None,
                push: false,
            },
            exp: now() + 60,
            access: vec![],
        };
        assert!(b.verify(&a.sign(&claims)).is_some());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("token.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(dir.path().join("token.key"), b"short").unwrap();
        let c = Signer::shared(dir.path());
        assert_ne!(c.key, a.key, "a damaged file: a key of this process");
    }

    #[test]
    fn hmac_matches_rfc4231_shape() {
        // RFC 4231 test case 2 uses a 4-byte key; pad it to 32 bytes with zeros, which is
        // the same key for HMAC (keys shorter than the block are zero padded).
        let mut key = [0u8; 32];
        key[..4].copy_from_slice(b"Jefe");
        let mac = hmac_sha256(&key, b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn tokens_verify_and_reject_tampering() {
        let s = Signer::new();
        let c = Claims {
            principal: Principal {
                subject: "a".into(),
                tenant: Some("t".into()),
                push: true,
            },
            exp: now() + 60,
            access: vec![("t/x".into(), true)],
        };
        let tok = s.sign(&c);
        assert!(s.verify(&tok).is_some());
        assert!(Signer::new().verify(&tok).is_none());
        let mut forged = tok.clone();
        forged.insert(6, 'x');
        assert!(s.verify(&forged).is_none());
        let old = Claims {
            exp: now() - 1,
            ..c
        };
        assert!(s.verify(&s.sign(&old)).is_none());
    }

    #[test]
    fn foreign_tenants_are_unknown_viewers_are_denied() {
        let viewer = Principal {
            subject: "v".into(),
            tenant: Some("a".into()),
            push: false,
        };
        let own = Repo::parse("a/x").unwrap();
        let other = Repo::parse("b/x").unwrap();
        assert!(decide(&viewer, &own, Action::Pull, false).is_ok());
        assert_eq!(
            decide(&viewer, &own, Action::Push, false).unwrap_err().code,
            Code::Denied
        );
        assert_eq!(
            decide(&viewer, &other, Action::Pull, false)
                .unwrap_err()
                .code,
            Code::NameUnknown
        );
        // A public repository: anyone pulls, only its tenant pushes.
        assert!(decide(&viewer, &other, Action::Pull, true).is_ok());
        assert_eq!(
            decide(&viewer, &other, Action::Push, true)
                .unwrap_err()
                .code,
            Code::NameUnknown
        );
    }
}
