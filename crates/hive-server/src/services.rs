//! What the server adds to services: their template revisions and history (numbered in the
//! same write as the spec change, so concurrent writers can neither lose nor share a
//! number), and the rollout actions (`POST …/services/{name}/rollout`).
//!
//! The rules themselves (numbering, the history's bound, which action is allowed when) are
//! in [`hive_api::rollout`]; this module reads, applies and writes under the object's
//! revision. Moving instances is the service controller's work, not this module's.

use std::collections::HashMap;

use axum::extract::{Path, State};
use axum::{Extension, Json};
use chrono::Utc;
use hive_api::rollout::{self, RolloutAction, RolloutError};
use hive_api::{ErrorCode, Resource, Role, Service};
use hive_store::{Op, StoreError};

use crate::auth::Principal;
use crate::error::{ApiError, ApiResult};
use crate::keys;
use crate::resources::{self, ApiJson, Target, load_tenant};
use crate::state::AppState;

/// How many times an action is tried when the service changed under it (the controller
/// writes its status as instances come and go).
const ACTION_ATTEMPTS: usize = 5;

/// Numbers a created service's template, or a changed template on a spec update.
pub fn stamp(by: &str, stored: Option<&Service>, obj: &mut Service) {
    let now = Utc::now();
    match stored {
        None => {
            // Status is the server's and the controller's, never the creator's.
            obj.status = Default::default();
            rollout::first_template(obj, format!("created by {by}"), now);
        }
        Some(stored) => {
            rollout::new_template(stored, obj, format!("updated by {by}"), now);
        }
    }
}

/// A status write (by the controller) keeps what the server owns: the revision, the
/// history and whether the canary was promoted.
pub fn keep_server_status(stored: &Service, obj: &mut Service) {
    obj.status.template_revision = stored.status.template_revision;
    obj.status.history = stored.status.history.clone();
    obj.status.rollout.promoted = stored.status.rollout.promoted;
    obj.status.vip = stored.status.vip.clone();
}

impl From<RolloutError> for ApiError {
    fn from(e: RolloutError) -> Self {
        let code = if e.is_invalid() {
            ErrorCode::Invalid
        } else {
            ErrorCode::Conflict
        };
        ApiError::new(code, e.to_string())
    }
}

/// `POST /tenants/{tenant}/services/{name}/rollout` with a [`RolloutAction`]: promote a
/// holding canary, roll an unfinished rollout back, or undo to a kept revision. Answers the
/// service as written.
pub async fn action(
    State(st): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(params): Path<HashMap<String, String>>,
    ApiJson(action): ApiJson<RolloutAction>,
) -> ApiResult<Json<Service>> {
    let target = Target::from_path(params);
    let tenant = target.tenant.as_deref().unwrap_or_default();
    let guard = load_tenant(&st, &p, tenant).await?;
    p.require(Role::Member, "roll out services")?;
    let name = target.name();
    let key = keys::object::<Service>(Some(tenant), name);
    for _ in 0..ACTION_ATTEMPTS {
        let (stored, stored_rev) = resources::read::<Service>(&st, Some(&guard), name).await?;
        let applied = rollout::apply(&stored, &action, &p.name, Utc::now())?;
        let mut obj = applied.service;
        obj.validate()?;
        let ops = vec![
            guard.require(),
            Op::Update {
                key: key.clone(),
                value: resources::encode(&obj)?,
                mod_revision: stored_rev,
            },
            resources::event_op(tenant, applied.reason, Service::KIND, name, applied.message)?,
        ];
        match st.store.txn(ops).await {
            Ok(resp) => {
                obj.set_revision(resp.revision);
                return Ok(Json(obj));
            }
            // Changed since read (usually the controller's status): check again.
            Err(StoreError::Conflict { key: k, .. }) if k == key => continue,
            Err(e) => {
                return Err(resources::txn_error::<Service>(e, name, Some(&guard)));
            }
        }
    }
    Err(ApiError::new(
        ErrorCode::Conflict,
        format!("service {name} kept changing under {ACTION_ATTEMPTS} attempts; retry"),
    ))
}
