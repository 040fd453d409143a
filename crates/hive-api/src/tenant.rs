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
    }
}
