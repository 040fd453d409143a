//! Nodes: the hosts that run instances. Platform-scoped; the agent on each node writes its
//! status and renews its lease.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::meta::{Resource, Scope};
use crate::validate::{self, ValidationError};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Node {
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
    #[serde(default)]
    pub spec: NodeSpec,
    #[serde(default)]
    pub status: NodeStatus,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    /// No new instances are placed here.
    #[serde(default)]
    pub unschedulable: bool,
    /// The tenant this node is bound to (tenant-exclusive nodes); absent: the pool, from which
    /// a node is bound to the tenant of its first instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Runs instances of any tenant and is never bound to one (e.g. `hive up`'s single
    /// machine). Tenants still get their own namespaces, cgroups and networks.
    #[serde(default)]
    pub shared: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NodeCapacity {
    #[serde(default)]
    pub cpu_millis: u64,
    #[serde(default)]
    pub memory_bytes: u64,
}

/// Written by the node's agent.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NodeStatus {
    #[serde(default)]
    pub capacity: NodeCapacity,
    #[serde(default)]
    pub allocatable: NodeCapacity,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub kernel: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub os: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub arch: String,
    /// The OCI runtime the agent drives.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub runtime: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub agent_version: String,
    /// When the agent last renewed its lease; absent until an agent runs on the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_renewed_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub ready: bool,
}

impl Resource for Node {
    const KIND: &'static str = "node";
    const PLURAL: &'static str = "nodes";
    const SCOPE: Scope = Scope::Cluster;
    crate::impl_object_meta!(cluster);

    crate::impl_spec_status!();

    fn validate(&self) -> Result<(), ValidationError> {
        self.validate_meta()?;
        if let Some(t) = &self.spec.tenant {
            validate::name("spec.tenant", t)?;
            if self.spec.shared {
                return Err(ValidationError::new(
                    "spec.shared",
                    "a node bound to a tenant cannot be shared",
                ));
            }
        }
        for (f, v) in [
            ("status.kernel", &self.status.kernel),
            ("status.os", &self.status.os),
            ("status.arch", &self.status.arch),
            ("status.runtime", &self.status.runtime),
            ("status.agent_version", &self.status.agent_version),
        ] {
            validate::kernel_string(f, v, 256)?;
        }
        Ok(())
    }
}
