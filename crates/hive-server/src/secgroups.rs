//! Security groups: what the server checks. A group's rules may name groups of the same
//! tenant (itself included), and a service's template may join groups of its tenant: each
//! named group must exist (another tenant's is "not found", like a missing one). A group
//! still named by a service or by another group's rule is not deleted (409).

use hive_api::{SecurityGroup, Service};

use crate::error::{ApiError, ApiResult};
use crate::keys;
use crate::resources::{Hooked, decode, list_all};
use crate::state::AppState;

/// Fails with "not found" for the first of `names` (other than `this`) that is not a group
/// of `tenant`.
async fn require_groups(
    st: &AppState,
    tenant: &str,
    names: &[String],
    this: Option<&str>,
) -> ApiResult<()> {
    for name in names {
        let name = name.as_str();
        if Some(name) == this {
            continue;
        }
        let key = keys::object::<SecurityGroup>(Some(tenant), name);
        if st.store.get(&key).await?.kv.is_none() {
            return Err(ApiError::not_found("security group", name, Some(tenant)));
        }
    }
    Ok(())
}

/// A group's rules name existing groups.
pub async fn group_written(
    st: &AppState,
    tenant: Option<&str>,
    g: &SecurityGroup,
) -> ApiResult<Hooked> {
    let tenant = tenant.unwrap_or_default();
    let refs: Vec<String> = g
        .spec
        .rules
        .iter()
        .filter_map(|r| r.group.clone())
        .collect();
    require_groups(st, tenant, &refs, Some(&g.name)).await?;
    Ok(Hooked::default())
}

/// A service joins existing groups.
pub async fn service_written(
    st: &AppState,
    tenant: Option<&str>,
    s: &Service,
) -> ApiResult<Hooked> {
    let tenant = tenant.unwrap_or_default();
    require_groups(st, tenant, &s.spec.template.security_groups, None).await?;
    Ok(Hooked::default())
}

/// Refuses to delete a group a service or another group still names.
pub async fn group_deleted(
    st: &AppState,
    tenant: Option<&str>,
    g: &SecurityGroup,
) -> ApiResult<Hooked> {
    let tenant = tenant.unwrap_or_default();
    let in_use = |by: String| {
        ApiError::new(
            hive_api::ErrorCode::Conflict,
            format!(
                "security group {:?} is still used by {by}: remove it there first",
                g.name
            ),
        )
    };
    for kv in list_all(st, &keys::collection::<Service>(Some(tenant))).await? {
        let s: Service = decode(&kv)?;
        if s.spec.template.security_groups.contains(&g.name) {
            return Err(in_use(format!("service {:?}", s.name)));
        }
    }
    for kv in list_all(st, &keys::collection::<SecurityGroup>(Some(tenant))).await? {
        let other: SecurityGroup = decode(&kv)?;
        if other.name != g.name
            && other
                .spec
                .rules
                .iter()
                .any(|r| r.group.as_deref() == Some(g.name.as_str()))
        {
            return Err(in_use(format!("a rule of security group {:?}", other.name)));
        }
    }
    Ok(Hooked::default())
}
