//! Tenants: the unit of isolation. Every tenant-scoped object lives under one.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::meta::{Resource, Scope};
use crate::validate::ValidationError;

/// A tenant. Create with `{"name": "acme"}`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Tenant {
    pub name: String,
    #[serde(default)]
    #[schema(read_only)]
    pub uid: String,
    #[serde(default)]
    pub revision: u64,
    #[serde(default)]
    #[schema(read_only)]
    pub created_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Limits on what the tenant may use (set by the platform admin).
    #[serde(default, skip_serializing_if = "TenantQuota::is_unlimited")]
    pub quota: TenantQuota,
}

/// A tenant's limits. Absent fields: no limit.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TenantQuota {
    /// Most bytes the tenant's image repositories may hold: each distinct blob (layer,
    /// config, manifest) once, however many of its repositories link it. A push that would
    /// go over is refused with the registry's `DENIED`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry_bytes: Option<u64>,
}

impl TenantQuota {
    pub fn is_unlimited(&self) -> bool {
        self.registry_bytes.is_none()
    }
}

impl Resource for Tenant {
    const KIND: &'static str = "tenant";
    const PLURAL: &'static str = "tenants";
    const SCOPE: Scope = Scope::Cluster;
    crate::impl_object_meta!(cluster);

    crate::impl_spec_status!(none);

    fn validate(&self) -> Result<(), ValidationError> {
        self.validate_meta()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_body_is_just_a_name() {
        let t: Tenant = serde_json::from_str(r#"{"name":"acme"}"#).unwrap();
        assert_eq!(t.name, "acme");
        assert!(t.validate().is_ok());
        let err = serde_json::from_str::<Tenant>(r#"{"name":"acme","colour":"red"}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `colour`"), "{err}");
        let t: Tenant =
            serde_json::from_str(r#"{"name":"acme","quota":{"registry_bytes":1024}}"#).unwrap();
        assert_eq!(t.quota.registry_bytes, Some(1024));
        let err = serde_json::from_str::<Tenant>(r#"{"name":"a","quota":{"cpus":1}}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `cpus`"), "{err}");
    }
}
