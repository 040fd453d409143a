//! Tenant routes that differ from the generic ones: a tenant's own token lists and reads only
//! its own tenant, and deleting a tenant removes everything it owns in one transaction.

use std::collections::HashMap;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::response::IntoResponse;
use axum::{Extension, Json};
use hive_api::{List, Role, Tenant};
use hive_store::Op;

use crate::auth::{Principal, TokenRecord};
use crate::error::{ApiError, ApiResult};
use crate::keys;
use crate::resources::{self, ListQuery, load_tenant};
use crate::state::AppState;

pub async fn list(
    State(st): State<AppState>,
    Extension(p): Extension<Principal>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> ApiResult<axum::response::Response> {
    if p.is_platform_admin() {
        return resources::list::<Tenant>(State(st), Extension(p), Path(HashMap::new()), q).await;
    }
    // A tenant's token sees exactly one tenant: its own.
    let own = p.tenant.clone().unwrap_or_default();
    let guard = load_tenant(&st, &p, &own).await?;
    Ok(Json(List {
        items: vec![std::sync::Arc::unwrap_or_clone(guard.tenant)],
        revision: guard.read_at,
        continue_: None,
    })
    .into_response())
}

pub async fn get(
    State(st): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(tenant): Path<String>,
) -> ApiResult<Json<Tenant>> {
    Ok(Json(std::sync::Arc::unwrap_or_clone(
        load_tenant(&st, &p, &tenant).await?.tenant,
    )))
}

/// Most token records removed in the same transaction as the tenant; any beyond are removed
/// right after (they are dead already: their tenant uid no longer exists).
const TOKENS_IN_DELETE_TXN: usize = 100;

pub async fn delete(
    State(st): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(tenant): Path<String>,
) -> ApiResult<Json<Tenant>> {
    let guard = load_tenant(&st, &p, &tenant).await?;
    p.require(Role::PlatformAdmin, "delete tenants")?;
    let tokens = resources::list_all(&st, &keys::token_index_prefix(Some(&tenant))).await?;
    let mut auth_keys = Vec::with_capacity(tokens.len());
    for kv in &tokens {
        let record: TokenRecord = serde_json::from_slice(&kv.value).map_err(|e| {
            ApiError::internal("internal error").log_cause(format!("token record {}: {e}", kv.key))
        })?;
        auth_keys.push(keys::auth(&record.hash));
    }
    let mut ops = vec![
        Op::Delete {
            key: keys::object::<Tenant>(None, &tenant),
            mod_revision: Some(guard.revision),
        },
        Op::DeletePrefix {
            prefix: keys::tenant_prefix(&tenant),
        },
    ];
    ops.extend(crate::networks::tenant_deleted(&st, &tenant).await?);
    let rest = auth_keys.split_off(auth_keys.len().min(TOKENS_IN_DELETE_TXN));
    ops.extend(auth_keys.into_iter().map(|key| Op::Delete {
        key,
        mod_revision: None,
    }));
    st.store
        .txn(ops)
        .await
        .map_err(|e| ApiError::from_store(e, "tenant", &tenant, None))?;
    // Its images go too: a tenant created later under the same name must not find them.
    if let Err(e) = st.registry.storage.delete_tenant(&tenant).await {
        tracing::warn!(%tenant, error = %e, "removing the image repositories of a deleted tenant");
    }
    for chunk in rest.chunks(TOKENS_IN_DELETE_TXN) {
        let ops = chunk
            .iter()
            .map(|key| Op::Delete {
                key: key.clone(),
                mod_revision: None,
            })
            .collect();
        if let Err(e) = st.store.txn(ops).await {
            tracing::warn!(%tenant, error = %e, "removing token records of a deleted tenant");
        }
    }
    Ok(Json(std::sync::Arc::unwrap_or_clone(guard.tenant)))
}
