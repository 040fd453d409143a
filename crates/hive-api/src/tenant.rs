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
        self.validate_meta()?;
        if let Some(v) = self.labels.get(SCHEDULING_WEIGHT_LABEL)
            && scheduling_weight(v).is_none()
        {
            return Err(ValidationError::new(
                format!("labels.{SCHEDULING_WEIGHT_LABEL}"),
                format!("{v:?} is not a whole number from 1 to {MAX_SCHEDULING_WEIGHT}"),
            ));
        }
        Ok(())
    }
}

/// Label of a tenant that sets its share of the scheduler against other tenants' (1 to
/// [`MAX_SCHEDULING_WEIGHT`], default 1): a tenant of weight 3 has three of its pending
/// instances placed for every one of a tenant of weight 1 while both wait. Only the platform
/// admin writes tenants, so a tenant cannot raise its own.
pub const SCHEDULING_WEIGHT_LABEL: &str = "hive.dev/scheduling-weight";
/// Largest scheduling weight.
pub const MAX_SCHEDULING_WEIGHT: u32 = 100;

/// The weight a value of [`SCHEDULING_WEIGHT_LABEL`] gives, if it is a valid one.
pub fn scheduling_weight(value: &str) -> Option<u32> {
    value
        .parse::<u32>()
        .ok()
        .filter(|w| (1..=MAX_SCHEDULING_WEIGHT).contains(w))
}

impl Tenant {
    /// The tenant's scheduling weight (1 without the label).
    pub fn scheduling_weight(&self) -> u32 {
        self.labels
            .get(SCHEDULING_WEIGHT_LABEL)
            .and_then(|v| scheduling_weight(v))
            .unwrap_or(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scheduling_weight_label_is_a_bounded_number() {
        let mut t = Tenant {
            name: "acme".into(),
            ..Default::default()
        };
        assert_eq!(t.scheduling_weight(), 1);
        t.labels.insert(SCHEDULING_WEIGHT_LABEL.into(), "3".into());
        assert!(t.validate().is_ok());
        assert_eq!(t.scheduling_weight(), 3);
        for bad in ["0", "101", "x", "-1"] {
            t.labels.insert(SCHEDULING_WEIGHT_LABEL.into(), bad.into());
            assert!(t.validate().is_err(), "{bad}");
        }
    }

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
