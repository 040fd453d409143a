//! Token routes: a tenant's tokens under `/api/v1/tenants/{tenant}/tokens`, the platform's
//! under `/api/v1/tokens`, and `/api/v1/whoami`.

use std::collections::HashMap;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use chrono::{Duration, Utc};
use hive_api::{ApiToken, CreatedToken, List, Role, TokenCreate, WhoAmI};
use hive_store::Op;

use crate::auth::{self, Principal, TokenRecord};
use crate::error::{ApiError, ApiResult};
use crate::keys;
use crate::resources::{self, ApiJson, Target, TenantGuard, load_tenant};
use crate::state::AppState;

pub async fn whoami(Extension(p): Extension<Principal>) -> Json<WhoAmI> {
    Json(WhoAmI {
        token_id: p.token_id,
        name: p.name,
        tenant: p.tenant,
        role: p.role,
    })
}

/// The tenant a token route acts in (None: the platform), after the role check.
async fn scope(st: &AppState, p: &Principal, target: &Target) -> ApiResult<Option<TenantGuard>> {
    match target.tenant.as_deref() {
        Some(t) => {
            let guard = load_tenant(st, p, t).await?;
            p.require(Role::TenantAdmin, "manage tokens")?;
            Ok(Some(guard))
        }
        None => {
            p.require(Role::PlatformAdmin, "manage platform tokens")?;
            Ok(None)
        }
    }
}

pub async fn create(
    State(st): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(params): Path<HashMap<String, String>>,
    ApiJson(req): ApiJson<TokenCreate>,
) -> ApiResult<(StatusCode, Json<CreatedToken>)> {
    let target = Target::from_path(params);
    let guard = scope(&st, &p, &target).await?;
    req.validate()?;
    match &guard {
        Some(_) if req.role == Role::PlatformAdmin => {
            return Err(ApiError::invalid(
                "role: platform-admin tokens cannot belong to a tenant",
            ));
        }
        Some(_) if req.role > p.role => {
            return Err(ApiError::forbidden(format!(
                "role {} may not create a token with role {}",
                p.role, req.role
            )));
        }
        None if req.role != Role::PlatformAdmin => {
            return Err(ApiError::invalid(
                "role: platform tokens have role platform-admin; create tenant tokens under \
                 /api/v1/tenants/{tenant}/tokens",
            ));
        }
        _ => {}
    }
    let expires_at = req
        .expires_in_secs
        .map(|s| Utc::now() + Duration::seconds(s as i64));
    let tenant = guard.as_ref().map(|g| (g.name.as_str(), g.uid.as_str()));
    let (secret, record) = auth::issue(&req.name, tenant, req.role, expires_at);
    let value = bytes::Bytes::from(
        serde_json::to_vec(&record)
            .map_err(|e| ApiError::internal(format!("encode token: {e}")))?,
    );
    let mut ops = Vec::with_capacity(3);
    if let Some(g) = &guard {
        ops.push(g.require());
    }
    ops.push(Op::Create {
        key: keys::auth(&record.hash),
        value: value.clone(),
    });
    ops.push(Op::Create {
        key: keys::token_index(guard.as_ref().map(|g| g.name.as_str()), &record.info.id),
        value,
    });
    st.store.txn(ops).await.map_err(|e| match (&guard, &e) {
        (Some(g), hive_store::StoreError::Conflict { key, .. })
            if *key == keys::object::<hive_api::Tenant>(None, &g.name) =>
        {
            ApiError::not_found("tenant", &g.name, None)
        }
        _ => ApiError::from_store(e, "token", &record.info.id, None),
    })?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedToken {
            token: secret,
            info: record.info,
        }),
    ))
}

pub async fn list(
    State(st): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(params): Path<HashMap<String, String>>,
) -> ApiResult<Json<List<ApiToken>>> {
    let target = Target::from_path(params);
    let guard = scope(&st, &p, &target).await?;
    let prefix = keys::token_index_prefix(guard.as_ref().map(|g| g.name.as_str()));
    let revision = st.store.current_revision().await?;
    let kvs = resources::list_all(&st, &prefix).await?;
    let mut items = Vec::with_capacity(kvs.len());
    for kv in kvs {
        let record: TokenRecord = serde_json::from_slice(&kv.value).map_err(|e| {
            ApiError::internal("internal error").log_cause(format!("token record {}: {e}", kv.key))
        })?;
        items.push(record.info);
    }
    Ok(Json(List {
        items,
        revision,
        continue_: None,
    }))
}

pub async fn delete(
    State(st): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(params): Path<HashMap<String, String>>,
) -> ApiResult<Json<ApiToken>> {
    let target = Target::from_path(params);
    let guard = scope(&st, &p, &target).await?;
    let tenant = guard.as_ref().map(|g| g.name.as_str());
    let id = target.name();
    let index = keys::token_index(tenant, id);
    let not_found = || ApiError::not_found("token", id, tenant);
    if id.len() != 16 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(not_found());
    }
    let kv = st.store.get(&index).await?.kv.ok_or_else(not_found)?;
    let record: TokenRecord = serde_json::from_slice(&kv.value).map_err(|e| {
        ApiError::internal("internal error").log_cause(format!("token record {}: {e}", kv.key))
    })?;
    st.store
        .txn(vec![
            Op::Delete {
                key: index,
                mod_revision: Some(kv.mod_revision),
            },
            Op::Delete {
                key: keys::auth(&record.hash),
                mod_revision: None,
            },
        ])
        .await
        .map_err(|e| ApiError::from_store(e, "token", id, tenant))?;
    Ok(Json(record.info))
}
