//! Authentication and authorization.
//!
//! Tokens are `hive_` followed by 256 random bits in hex. The store keeps only their SHA-256:
//! `/auth/{sha256}` holds the token's record (id, tenant and that tenant's uid, role, expiry).
//! A request's bearer token is hashed and looked up; the tenant must still exist with the same
//! uid (a tenant deleted and created again does not revive old tokens).
//!
//! Authorization has one rule for isolation: outside the platform admin, a token only ever sees
//! its own tenant, and another tenant's objects answer exactly like missing ones.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::Response;
use chrono::{DateTime, Utc};
use hive_api::{ApiToken, ErrorCode, Role, Tenant};
use hive_store::Store;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{ApiError, ApiResult};
use crate::keys;
use crate::state::AppState;

pub const TOKEN_PREFIX: &str = "hive_";

/// What the store keeps of a token: its public part and the tenant uid it was issued in.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenRecord {
    #[serde(flatten)]
    pub info: ApiToken,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_uid: Option<String>,
    pub hash: String,
}

/// A fresh secret and its hash.
pub fn new_secret() -> (String, String) {
    let bytes: [u8; 32] = rand::random();
    let secret = format!("{TOKEN_PREFIX}{}", hex::encode(bytes));
    let hash = hash_secret(&secret);
    (secret, hash)
}

pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// A public token id: derived from the hash so it needs no index, short enough to type.
pub fn token_id(hash: &str) -> String {
    hash[..16].to_owned()
}

/// The caller, once authenticated.
#[derive(Clone, Debug)]
pub struct Principal {
    pub token_id: String,
    pub name: String,
    pub tenant: Option<String>,
    /// The uid of `tenant` when the token was issued.
    pub tenant_uid: Option<String>,
    pub role: Role,
    /// The leader's epoch a controller's request carries (`Hive-Leader-Epoch`): its writes
    /// apply only while that term lasts.
    pub fence: Option<hive_store::Revision>,
}

impl Principal {
    /// The condition that fences this caller's writes to its leader's term, if it has one.
    pub fn fence_op(&self) -> Option<hive_store::Op> {
        self.fence.map(|epoch| hive_store::Op::Require {
            key: crate::leader::LEADER_KEY.into(),
            mod_revision: epoch,
        })
    }

    pub fn is_platform_admin(&self) -> bool {
        self.role == Role::PlatformAdmin
    }

    /// May this caller see `tenant` at all? If not, the caller must get the same answer as for
    /// a tenant that does not exist.
    pub fn sees_tenant(&self, tenant: &str) -> bool {
        self.is_platform_admin() || self.tenant.as_deref() == Some(tenant)
    }

    /// Checks the caller's role inside a tenant it can see.
    pub fn require(&self, need: Role, action: &str) -> ApiResult<()> {
        if self.role >= need {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!(
                "role {} may not {action} (needs {need} or higher)",
                self.role
            )))
        }
    }
}

fn bearer(req: &Request) -> ApiResult<&str> {
    let value = req
        .headers()
        .get(header::AUTHORIZATION)
        .ok_or_else(|| ApiError::unauthenticated("missing Authorization: Bearer <token> header"))?;
    let value = value
        .to_str()
        .map_err(|_| ApiError::unauthenticated("Authorization header is not valid text"))?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .ok_or_else(|| ApiError::unauthenticated("Authorization header must be Bearer <token>"))?
        .trim();
    if token.is_empty() || token.len() > 256 {
        return Err(ApiError::unauthenticated("token is unknown or revoked"));
    }
    Ok(token)
}

/// Resolves a secret to its principal, checking expiry and that its tenant still exists.
///
/// Read from the watch cache first; a token it does not know (or whose tenant it does not
/// know as the token's) is looked up in the store itself, so a token created through another
/// server a moment ago works here at once.
pub async fn resolve(
    store: &Arc<dyn Store>,
    cache: &PrincipalCache,
    secret: &str,
) -> ApiResult<Principal> {
    if let Some(known) = cache.get(secret)
        && known.still_valid(store.as_ref()).await?
    {
        return Ok(known.principal.clone());
    }
    let resolved = match resolve_with(store, secret, false).await {
        Err(e) if e.code == ErrorCode::Unauthenticated => resolve_with(store, secret, true).await,
        resolved => resolved,
    }?;
    let principal = resolved.principal.clone();
    cache.insert(secret, resolved);
    Ok(principal)
}

/// A secret resolved: its principal, and what it was resolved from.
#[derive(Debug)]
struct Resolved {
    principal: Principal,
    expires_at: Option<DateTime<Utc>>,
    /// The token record's key and revision.
    token: (String, hive_store::Revision),
    /// The tenant's key and revision, for a tenant's token.
    tenant: Option<(String, hive_store::Revision)>,
}

impl Resolved {
    /// True while the token record and the tenant are exactly what this was resolved from
    /// (any change — revoked, re-issued, tenant deleted or re-created — moves a revision) and
    /// the token has not expired. Two reads of the store (of the watch cache: lookups in
    /// memory), no hashing, no decoding.
    async fn still_valid(&self, store: &dyn Store) -> ApiResult<bool> {
        if self.expires_at.is_some_and(|exp| exp <= Utc::now()) {
            return Ok(false);
        }
        let same =
            |kv: Option<hive_store::KeyValue>, rev| kv.is_some_and(|kv| kv.mod_revision == rev);
        if !same(store.get(&self.token.0).await?.kv, self.token.1) {
            return Ok(false);
        }
        match &self.tenant {
            Some((key, rev)) => Ok(same(store.get(key).await?.kv, *rev)),
            None => Ok(true),
        }
    }
}

/// Secrets already resolved (at most [`PrincipalCache::MAX`]; emptied when full), each checked
/// against the store on every use, so a revoked token or a deleted tenant is refused exactly
/// as without it. What it saves per request is hashing the secret and decoding two records.
#[derive(Clone, Default)]
pub struct PrincipalCache(Arc<std::sync::Mutex<std::collections::HashMap<String, Arc<Resolved>>>>);

impl std::fmt::Debug for PrincipalCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secrets.
        let n = self.0.lock().map(|m| m.len()).unwrap_or_default();
        f.debug_struct("PrincipalCache")
            .field("entries", &n)
            .finish()
    }
}

impl PrincipalCache {
    const MAX: usize = 10_000;

    fn get(&self, secret: &str) -> Option<Arc<Resolved>> {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.get(secret).cloned()
    }

    fn insert(&self, secret: &str, resolved: Resolved) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= Self::MAX {
            map.clear();
        }
        map.insert(secret.to_owned(), Arc::new(resolved));
    }
}

async fn resolve_with(store: &Arc<dyn Store>, secret: &str, uncached: bool) -> ApiResult<Resolved> {
    let read = |key: String| async move {
        if uncached {
            store.get_uncached(&key).await
        } else {
            store.get(&key).await
        }
    };
    let hash = hash_secret(secret);
    let got = read(keys::auth(&hash)).await?;
    let kv = got
        .kv
        .ok_or_else(|| ApiError::unauthenticated("token is unknown or revoked"))?;
    let record: TokenRecord = serde_json::from_slice(&kv.value).map_err(|e| {
        ApiError::internal("internal error").log_cause(format!("token record {}: {e}", kv.key))
    })?;
    if let Some(exp) = record.info.expires_at
        && exp <= Utc::now()
    {
        return Err(ApiError::new(
            ErrorCode::TokenExpired,
            format!("token {} expired at {}", record.info.id, exp.to_rfc3339()),
        ));
    }
    let mut tenant = None;
    if let Some(name) = &record.info.tenant {
        let key = keys::object::<Tenant>(None, name);
        let t = read(key.clone()).await?.kv;
        let rev = t.as_ref().map(|kv| kv.mod_revision).unwrap_or_default();
        let alive = t
            .and_then(|kv| serde_json::from_slice::<Tenant>(&kv.value).ok())
            .is_some_and(|t| Some(&t.uid) == record.tenant_uid.as_ref());
        if !alive {
            return Err(ApiError::unauthenticated("token is unknown or revoked"));
        }
        tenant = Some((key, rev));
    }
    Ok(Resolved {
        expires_at: record.info.expires_at,
        token: (kv.key, kv.mod_revision),
        tenant,
        principal: Principal {
            token_id: record.info.id,
            name: record.info.name,
            tenant: record.info.tenant,
            tenant_uid: record.tenant_uid,
            role: record.info.role,
            fence: None,
        },
    })
}

/// Authenticates every request under `/api/v1` that needs it and applies the rate limit.
pub async fn authenticate(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let secret = bearer(&req)?;
    let mut principal = resolve(&state.store, &state.principals, secret).await?;
    if let Some(v) = req.headers().get(crate::leader::EPOCH_HEADER) {
        let epoch = v
            .to_str()
            .ok()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| {
                ApiError::invalid(format!(
                    "header {}: expected a store revision",
                    crate::leader::EPOCH_HEADER
                ))
            })?;
        principal.fence = Some(epoch);
    }
    // The limit keeps one tenant from crowding out the others. The platform's own
    // identities (the controllers, the node agents, the operator) are not limited: a burst
    // of a tenant's work is theirs to carry out, not to be refused for.
    if principal.role != Role::PlatformAdmin
        && let Err(retry_after) = state.limiter.check(&principal.token_id)
    {
        return Err(ApiError {
            code: ErrorCode::RateLimited,
            message: format!(
                "token {} is over its rate limit, retry after {retry_after}s",
                principal.token_id
            ),
            retry_after: Some(retry_after),
        });
    }
    req.extensions_mut().insert(principal);
    Ok(next.run(req).await)
}

/// The registry's view of Hive API tokens: the same resolution as `/api/v1`; members and
/// above may push, viewers pull, the platform admin reaches every tenant.
#[derive(Clone)]
pub struct RegistryTokens {
    pub store: Arc<dyn Store>,
    pub principals: PrincipalCache,
}

impl std::fmt::Debug for RegistryTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryTokens").finish_non_exhaustive()
    }
}

#[async_trait::async_trait]
impl hive_registry::RegistryAuth for RegistryTokens {
    async fn resolve(&self, secret: &str) -> Option<hive_registry::Principal> {
        let p = resolve(&self.store, &self.principals, secret).await.ok()?;
        let admin = p.is_platform_admin();
        Some(hive_registry::Principal {
            subject: p.name,
            tenant: if admin { None } else { p.tenant },
            push: p.role >= Role::Member,
        })
    }

    async fn quota(&self, tenant: &str) -> Option<u64> {
        crate::images::quota_of(self.store.as_ref(), tenant).await
    }
}

/// A new token record for `tenant` (with that tenant's uid), and its secret.
pub fn issue(
    name: &str,
    tenant: Option<(&str, &str)>,
    role: Role,
    expires_at: Option<DateTime<Utc>>,
) -> (String, TokenRecord) {
    let (secret, hash) = new_secret();
    let record = TokenRecord {
        info: ApiToken {
            id: token_id(&hash),
            name: name.to_owned(),
            tenant: tenant.map(|(t, _)| t.to_owned()),
            role,
            created_at: Utc::now(),
            expires_at,
        },
        tenant_uid: tenant.map(|(_, uid)| uid.to_owned()),
        hash,
    };
    (secret, record)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_256_bit_and_hashed() {
        let (secret, hash) = new_secret();
        assert!(secret.starts_with(TOKEN_PREFIX));
        assert_eq!(secret.len(), TOKEN_PREFIX.len() + 64);
        assert_eq!(hash, hash_secret(&secret));
        assert_eq!(hash.len(), 64);
        assert!(!hash.contains(&secret[TOKEN_PREFIX.len()..]));
        let (other, _) = new_secret();
        assert_ne!(secret, other);
        assert_eq!(token_id(&hash).len(), 16);
    }

    #[test]
    fn roles_gate_actions() {
        let p = Principal {
            token_id: "x".into(),
            name: "n".into(),
            tenant: Some("a".into()),
            tenant_uid: Some("u".into()),
            role: Role::Viewer,
            fence: None,
        };
        assert!(p.sees_tenant("a") && !p.sees_tenant("b"));
        assert!(p.require(Role::Viewer, "read").is_ok());
        let err = p.require(Role::Member, "create services").unwrap_err();
        assert_eq!(err.code, ErrorCode::Forbidden);
        assert!(err.message.contains("role viewer may not create services"));
    }
}
