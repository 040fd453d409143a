//! The tenant's image repositories under `/api/v1/tenants/{tenant}/images`: list them with
//! their tags, sizes and the tenant's usage against its quota, make one public or private,
//! delete one. The registry crate owns the content; this is the API's view of it. Also the
//! registry's garbage collection: on demand for the platform admin, and on a timer.

use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::{Extension, Json};
use hive_api::{ImageList, ImageRepository, ImageTag, ImageUpdate, RegistryGcReport, Role, Tenant};
use hive_registry::names::Repo;
use hive_registry::{Code, RegistryError, RepoInfo};
use serde::Deserialize;

use crate::auth::Principal;
use crate::error::{ApiError, ApiResult};
use crate::resources::{ApiJson, load_tenant};
use crate::state::AppState;

fn repository(info: RepoInfo) -> ImageRepository {
    ImageRepository {
        name: info.name,
        public: info.public,
        tags: info
            .tags
            .into_iter()
            .map(|(tag, digest)| ImageTag { tag, digest })
            .collect(),
        manifests: info.manifests as u64,
        size_bytes: info.size,
    }
}

/// `<tenant>/<name>` from the path's `name`, which must not name another tenant.
fn repo_of(tenant: &str, name: &str) -> ApiResult<Repo> {
    Repo::parse(&format!("{tenant}/{name}")).map_err(|e| ApiError::invalid(e.message))
}

fn registry_error(e: RegistryError, tenant: &str, name: &str) -> ApiError {
    match e.code {
        Code::NameUnknown => ApiError::not_found("image repository", name, Some(tenant)),
        _ => ApiError::internal("internal error").log_cause(e.message),
    }
}

pub async fn list(
    State(st): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(tenant): Path<String>,
) -> ApiResult<Json<ImageList>> {
    let guard = load_tenant(&st, &p, &tenant).await?;
    let storage = &st.registry.storage;
    let items = storage
        .repositories(&tenant)
        .await
        .map_err(|e| registry_error(e, &tenant, ""))?;
    let usage_bytes = storage
        .tenant_usage(&tenant)
        .await
        .map_err(|e| registry_error(e, &tenant, ""))?;
    Ok(Json(ImageList {
        items: items.into_iter().map(repository).collect(),
        usage_bytes,
        quota_bytes: guard.tenant.quota.registry_bytes,
    }))
}

async fn find(st: &AppState, tenant: &str, name: &str) -> ApiResult<ImageRepository> {
    let full = repo_of(tenant, name)?;
    st.registry
        .storage
        .repositories(tenant)
        .await
        .map_err(|e| registry_error(e, tenant, name))?
        .into_iter()
        .find(|r| r.name == full.as_str())
        .map(repository)
        .ok_or_else(|| ApiError::not_found("image repository", name, Some(tenant)))
}

pub async fn get(
    State(st): State<AppState>,
    Extension(p): Extension<Principal>,
    Path((tenant, name)): Path<(String, String)>,
) -> ApiResult<Json<ImageRepository>> {
    load_tenant(&st, &p, &tenant).await?;
    Ok(Json(find(&st, &tenant, &name).await?))
}

pub async fn update(
    State(st): State<AppState>,
    Extension(p): Extension<Principal>,
    Path((tenant, name)): Path<(String, String)>,
    ApiJson(change): ApiJson<ImageUpdate>,
) -> ApiResult<Json<ImageRepository>> {
    load_tenant(&st, &p, &tenant).await?;
    p.require(Role::Member, "change image repositories")?;
    let repo = repo_of(&tenant, &name)?;
    st.registry
        .storage
        .set_public(&repo, change.public)
        .await
        .map_err(|e| registry_error(e, &tenant, &name))?;
    Ok(Json(find(&st, &tenant, &name).await?))
}

pub async fn delete(
    State(st): State<AppState>,
    Extension(p): Extension<Principal>,
    Path((tenant, name)): Path<(String, String)>,
) -> ApiResult<Json<ImageRepository>> {
    load_tenant(&st, &p, &tenant).await?;
    p.require(Role::Member, "delete image repositories")?;
    let found = find(&st, &tenant, &name).await?;
    let repo = repo_of(&tenant, &name)?;
    st.registry
        .storage
        .delete_repo(&repo)
        .await
        .map_err(|e| registry_error(e, &tenant, &name))?;
    Ok(Json(found))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GcQuery {
    /// Links younger than this are kept (pushes in flight); default one hour.
    pub grace_seconds: Option<u64>,
}

/// The grace period of collections that nobody asked for: longer than any push.
pub const DEFAULT_GC_GRACE: Duration = Duration::from_secs(3600);

pub async fn gc(
    State(st): State<AppState>,
    Extension(p): Extension<Principal>,
    q: Result<Query<GcQuery>, QueryRejection>,
) -> ApiResult<Json<RegistryGcReport>> {
    p.require(Role::PlatformAdmin, "collect registry garbage")?;
    let q = crate::resources::query(q)?;
    let grace = q
        .grace_seconds
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_GC_GRACE);
    Ok(Json(collect(&st, grace).await?))
}

/// Collects the registry's garbage every `registry_gc_interval`, forever.
pub async fn run_gc(st: AppState) {
    let every = st.config.registry_gc_interval;
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = collect(&st, DEFAULT_GC_GRACE).await {
            tracing::warn!(error = %e, "registry garbage collection");
        }
    }
}

/// Runs one collection of the registry.
pub async fn collect(st: &AppState, grace: Duration) -> ApiResult<RegistryGcReport> {
    let r = st
        .registry
        .storage
        .gc(grace)
        .await
        .map_err(|e| ApiError::internal("internal error").log_cause(e.message))?;
    tracing::info!(
        unlinked = r.unlinked,
        deleted = r.deleted,
        freed_bytes = r.freed_bytes,
        kept = r.kept,
        "registry garbage collected"
    );
    Ok(RegistryGcReport {
        unlinked: r.unlinked as u64,
        deleted: r.deleted as u64,
        freed_bytes: r.freed_bytes,
        kept: r.kept as u64,
    })
}

/// The registry's view of tenant quotas.
pub async fn quota_of(st: &dyn hive_store::Store, tenant: &str) -> Option<u64> {
    let kv = st
        .get(&crate::keys::object::<Tenant>(None, tenant))
        .await
        .ok()?
        .kv?;
    let t: Tenant = serde_json::from_slice(&kv.value).ok()?;
    t.quota.registry_bytes
}
